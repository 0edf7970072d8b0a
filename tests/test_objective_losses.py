import math

import pytest
import torch
import torch.nn.functional as F

from nld_train.objective import JointObjective, Prepared
from nld_train.objective.losses import ar_sums, diffusion_sums, normalized_loss, reported_losses

LN2 = math.log(2)
MODES = ("combined", "separate", "per_microbatch")


def test_hand_computed_toy():
    # Vocabulary of 3; softmax(log q) = q, so CE = -ln q[target]: only ln2 and ln4 appear.
    A = torch.tensor([0.5, 0.25, 0.25]).log()   # favours id 0
    Bq = torch.tensor([0.25, 0.5, 0.25]).log()  # favours id 1
    tokens = torch.tensor([[0, 1, 2, 0]])
    labels = torch.tensor([[1, 2, 0, 0]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])   # last label is padding
    masked = torch.tensor([[False, True, False, True]])
    p = torch.tensor([0.5])

    logits_noisy = torch.stack([A, Bq, A, Bq])         # positions 0..3 of x_t
    logits_clean = torch.stack([A, A, A, A])           # positions 0..3 of x_0
    ce_noisy = F.cross_entropy(logits_noisy, tokens[0], reduction="none")[None]  # unshifted target
    ce_clean = F.cross_entropy(logits_clean, labels[0], reduction="none")[None]  # next token

    # By hand: noisy masked pos 1 (target 1 under Bq) = ln2, pos 3 (target 0 under Bq) = ln4.
    # S_d = (ln2 + 2 ln2) / 0.5 = 6 ln2, N_m = 2.
    # AR: targets 1, 2, 0 under A = ln4, ln4, ln2 (pos 3 masked out): S_ar = 5 ln2, N_ar = 3.
    s_ar, n_ar = ar_sums(ce_clean, loss_mask)
    s_d, n_m = diffusion_sums(ce_noisy, masked, p)
    assert math.isclose(s_ar.item(), 5 * LN2, rel_tol=1e-6) and n_ar.item() == 3
    assert math.isclose(s_d.item(), 6 * LN2, rel_tol=1e-6) and n_m.item() == 2
    assert s_ar.dtype == torch.float32 and s_ar.dim() == 0 and n_m.dim() == 0

    combined = (0.3 * 6 * LN2 + 5 * LN2) / (2 + 3)       # = 1.36 ln2
    separate = 0.3 * 6 * LN2 / 2 + 5 * LN2 / 3           # = (0.9 + 5/3) ln2
    kw = dict(alpha=0.3, ar_weight=1.0)
    assert math.isclose(normalized_loss(s_ar, s_d, n_ar, n_m, normalization="combined", **kw).item(),
                        combined, rel_tol=1e-6)
    assert math.isclose(normalized_loss(s_ar, s_d, n_ar, n_m, normalization="separate", **kw).item(),
                        separate, rel_tol=1e-6)
    rep = reported_losses(s_ar, s_d, n_ar, n_m, normalization="combined", has_diffusion=True, **kw)
    assert math.isclose(rep["loss"], combined, rel_tol=1e-6)
    assert math.isclose(rep["loss_ar"], 5 * LN2 / 3, rel_tol=1e-6)
    assert math.isclose(rep["loss_diff"], 3 * LN2, rel_tol=1e-6)

    # The same numbers through JointObjective.sums on the 2L CE layout.
    obj = JointObjective(mask_token_id=100, block_size=2)
    prep = Prepared(input_ids=None, position_ids=None, attention="joint", targets=None,
                    loss_mask=loss_mask, masked=masked, p=p, n_ar=n_ar, n_diff=n_m)
    s_ar2, s_d2 = obj.sums(torch.cat([ce_noisy, ce_clean], 1), prep)
    assert torch.allclose(s_ar2, s_ar) and torch.allclose(s_d2, s_d)


def _random_batch(b=8, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ce_noisy = torch.rand(b, L, generator=g) * 5
    ce_clean = torch.rand(b, L, generator=g) * 5
    p = torch.rand(b, generator=g) * 0.999 + 1e-3
    masked = torch.rand(b, L, generator=g) < p[:, None]   # counts differ across rows
    loss_mask = (torch.rand(b, L, generator=g) < 0.7).float()
    return ce_noisy, ce_clean, masked, p, loss_mask


def _per_microbatch_losses(ce_noisy, ce_clean, masked, p, loss_mask, mbs, normalization):
    b = ce_noisy.shape[0]
    _, n_ar = ar_sums(ce_clean, loss_mask)
    _, n_d = diffusion_sums(ce_noisy, masked, p)
    total = 0
    for i in range(0, b, mbs):
        sl = slice(i, i + mbs)
        s_ar, own_ar = ar_sums(ce_clean[sl], loss_mask[sl])
        s_d, own_d = diffusion_sums(ce_noisy[sl], masked[sl], p[sl])
        if normalization == "per_microbatch":
            total = total + normalized_loss(s_ar, s_d, own_ar, own_d, alpha=0.3, ar_weight=1.0,
                                            normalization=normalization, n_microbatches=b // mbs)
        else:
            total = total + normalized_loss(s_ar, s_d, n_ar, n_d, alpha=0.3, ar_weight=1.0,
                                            normalization=normalization)
    return total


@pytest.mark.parametrize("normalization", ["combined", "separate"])
def test_global_averaging_invariant_to_split(normalization):
    batch = _random_batch()
    full = _per_microbatch_losses(*batch, mbs=8, normalization=normalization)
    for mbs in (1, 2, 4):
        split = _per_microbatch_losses(*batch, mbs=mbs, normalization=normalization)
        assert abs(split.item() - full.item()) < 1e-6, (mbs, split.item(), full.item())


def test_per_microbatch_differs_from_combined():
    batch = _random_batch()
    combined = _per_microbatch_losses(*batch, mbs=1, normalization="combined")
    per_mb = _per_microbatch_losses(*batch, mbs=1, normalization="per_microbatch")
    assert abs(per_mb.item() - combined.item()) > 1e-3
    # With a single micro-batch the two coincide.
    assert torch.allclose(_per_microbatch_losses(*batch, mbs=8, normalization="per_microbatch"),
                          _per_microbatch_losses(*batch, mbs=8, normalization="combined"))


@pytest.mark.parametrize("normalization", ["combined", "separate"])
def test_gradients_invariant_to_split(normalization):
    ce_noisy, ce_clean, masked, p, loss_mask = _random_batch(seed=1)
    grads = []
    for mbs in (8, 2, 1):
        cn, cc = ce_noisy.clone().requires_grad_(), ce_clean.clone().requires_grad_()
        _per_microbatch_losses(cn, cc, masked, p, loss_mask, mbs, normalization).backward()
        grads.append((cn.grad, cc.grad))
    for gn, gc in grads[1:]:
        torch.testing.assert_close(gn, grads[0][0], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(gc, grads[0][1], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("normalization", MODES)
def test_zero_counts_are_finite(normalization):
    ce = torch.rand(2, 8, requires_grad=True)
    none = torch.zeros(2, 8, dtype=torch.bool)
    s_d, n_d = diffusion_sums(ce, none, torch.tensor([0.5, 0.5]))
    s_ar, n_ar = ar_sums(ce, torch.ones(2, 8))
    loss = normalized_loss(s_ar, s_d, n_ar, n_d, alpha=0.3, ar_weight=1.0, normalization=normalization)
    assert torch.isfinite(loss) and math.isclose(loss.item(), ce.sum().item() / 16, rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(ce.grad).all()
    # Everything empty (e.g. a fully padded micro-batch) and AR-only with plain numbers.
    assert normalized_loss(torch.tensor(0.0), 0, 0, 0, alpha=0.3, ar_weight=1.0,
                           normalization=normalization).item() == 0.0
    assert normalized_loss(6.0, 0.0, 3, 0, alpha=0.0, ar_weight=1.0, normalization=normalization).item() == 2.0
    rep = reported_losses(0.0, 0.0, 0, 0, alpha=0.3, ar_weight=1.0, normalization=normalization,
                          has_diffusion=True)
    assert all(math.isfinite(v) for v in rep.values())


def test_non_finite_ce_at_ignored_positions_does_not_leak():
    ce = torch.tensor([[1.0, float("inf"), float("nan")]])
    s_ar, _ = ar_sums(ce, torch.tensor([[1.0, 0.0, 0.0]]))
    s_d, _ = diffusion_sums(ce, torch.tensor([[True, False, False]]), torch.tensor([0.5]))
    assert s_ar.item() == 1.0 and s_d.item() == 2.0


def test_reported_losses_keys_and_per_microbatch_value():
    kw = dict(alpha=0.5, ar_weight=1.0)
    ar_only = reported_losses(8.0, 0.0, 4, 0, normalization="combined", has_diffusion=False, **kw)
    assert ar_only == {"loss": 2.0, "loss_ar": 2.0}
    joint = reported_losses(8.0, 4.0, 4, 2, normalization="per_microbatch", has_diffusion=True, **kw)
    assert joint == pytest.approx({"loss": (0.5 * 4 + 8) / 6, "loss_ar": 2.0, "loss_diff": 2.0})
    sep = reported_losses(8.0, 4.0, 4, 2, normalization="separate", has_diffusion=True, **kw)
    assert math.isclose(sep["loss"], 0.5 * 2 + 2)


def test_unknown_normalization():
    for fn in (lambda: normalized_loss(1.0, 1.0, 1, 1, alpha=1, ar_weight=1, normalization="mean"),
               lambda: reported_losses(1.0, 1.0, 1, 1, alpha=1, ar_weight=1, normalization="mean",
                                       has_diffusion=True)):
        with pytest.raises(ValueError, match="combined, separate, per_microbatch"):
            fn()
