import pytest
import torch

from nld_train.objective import ARObjective, JointObjective, build_objective

MASK = 100


def _batch(b=4, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(MASK + 1, 1000, (b, L + 1), generator=g)
    tokens, labels = stream[:, :-1], stream[:, 1:]
    loss_mask = torch.ones(b, L)
    loss_mask[:, :5] = 0          # an SFT-style prompt: labels 0..4 are not targets
    loss_mask[1, -3:] = 0         # some padding at the end of one row
    return tokens, labels, loss_mask


def test_ar_prepare_and_sums():
    tokens, labels, loss_mask = _batch()
    obj = build_objective("ar")
    assert isinstance(obj, ARObjective) and not obj.has_diffusion
    prep = obj.prepare(tokens, labels, loss_mask, [0, 1, 2, 3])
    assert prep.attention == "causal"
    assert torch.equal(prep.input_ids, tokens) and torch.equal(prep.targets, labels)
    assert torch.equal(prep.position_ids, torch.arange(16).repeat(4, 1))
    assert prep.masked is None and prep.p is None
    assert prep.n_ar.item() == loss_mask.sum().item() and prep.n_diff.item() == 0
    ce = torch.rand(4, 16)
    s_ar, s_diff = obj.sums(ce, prep)
    assert torch.allclose(s_ar, (ce * loss_mask).sum()) and s_diff.item() == 0
    loss = obj.normalized_loss(s_ar, s_diff, prep.n_ar, prep.n_diff)
    assert torch.allclose(loss, s_ar / prep.n_ar)
    assert set(obj.reported_losses(s_ar, s_diff, prep.n_ar, prep.n_diff)) == {"loss", "loss_ar"}


def test_joint_prepare_layout():
    tokens, labels, loss_mask = _batch()
    obj = build_objective("joint", mask_token_id=MASK, block_size=4)
    assert isinstance(obj, JointObjective) and obj.has_diffusion
    prep = obj.prepare(tokens, labels, loss_mask, [10, 11, 12, 13])
    b, L = tokens.shape
    assert prep.attention == "joint"
    assert prep.input_ids.shape == prep.position_ids.shape == prep.targets.shape == (b, 2 * L)
    assert prep.loss_mask.shape == prep.masked.shape == (b, L) and prep.p.shape == (b,)
    # clean half is x_0; noisy half is x_0 with masked positions replaced by the mask id
    assert torch.equal(prep.input_ids[:, L:], tokens)
    noisy = prep.input_ids[:, :L]
    assert torch.equal(noisy == MASK, prep.masked)
    assert torch.equal(noisy[~prep.masked], tokens[~prep.masked])
    # targets: same-position clean token for the noisy half, next token for the clean half
    assert torch.equal(prep.targets[:, :L], tokens) and torch.equal(prep.targets[:, L:], labels)
    assert torch.equal(prep.position_ids, torch.arange(L).repeat(b, 2))
    # prompt tokens 0..5 (targets of no label) never get masked; nor the row-1 padding tail
    assert not prep.masked[:, :6].any()
    assert not prep.masked[1, -2:].any()
    assert prep.n_diff.item() == prep.masked.sum().item()
    assert prep.n_ar.item() == loss_mask.sum().item()


def test_joint_noise_reproducible_and_split_invariant():
    tokens, labels, loss_mask = _batch(L=64)
    loss_mask = torch.ones_like(loss_mask)
    obj = JointObjective(mask_token_id=MASK, block_size=8)
    whole = obj.prepare(tokens, labels, loss_mask, [0, 1, 2, 3])
    again = obj.prepare(tokens, labels, loss_mask, [0, 1, 2, 3])
    assert torch.equal(whole.input_ids, again.input_ids) and torch.equal(whole.p, again.p)
    first = obj.prepare(tokens[:2], labels[:2], loss_mask[:2], [0, 1])
    second = obj.prepare(tokens[2:], labels[2:], loss_mask[2:], [2, 3])
    assert torch.equal(torch.cat([first.input_ids, second.input_ids]), whole.input_ids)
    assert torch.equal(torch.cat([first.p, second.p]), whole.p)
    # other samples (or another run seed) get other noise
    other = obj.prepare(tokens, labels, loss_mask, [4, 5, 6, 7])
    assert not torch.equal(other.masked, whole.masked)
    reseeded = JointObjective(mask_token_id=MASK, block_size=8, seed=99).prepare(tokens, labels, loss_mask,
                                                                                [0, 1, 2, 3])
    assert not torch.equal(reseeded.masked, whole.masked)


def test_joint_sums_and_loss():
    tokens, labels, loss_mask = _batch()
    obj = JointObjective(mask_token_id=MASK, block_size=4, alpha=0.3)
    prep = obj.prepare(tokens, labels, loss_mask, [0, 1, 2, 3])
    ce = torch.rand(4, 32)
    s_ar, s_diff = obj.sums(ce, prep)
    assert torch.allclose(s_ar, (ce[:, 16:] * loss_mask).sum())
    assert torch.allclose(s_diff, (ce[:, :16] / prep.p[:, None] * prep.masked).sum())
    loss = obj.normalized_loss(s_ar, s_diff, prep.n_ar, prep.n_diff)
    assert torch.allclose(loss, (0.3 * s_diff + s_ar) / (prep.n_diff + prep.n_ar))
    rep = obj.reported_losses(s_ar, s_diff, prep.n_ar, prep.n_diff)
    assert set(rep) == {"loss", "loss_ar", "loss_diff"}
    with pytest.raises(ValueError, match="2L"):
        obj.sums(ce[:, :16], prep)


def test_validation():
    tokens, labels, loss_mask = _batch(L=16)
    with pytest.raises(ValueError, match="block_size 5"):
        JointObjective(mask_token_id=MASK, block_size=5).prepare(tokens, labels, loss_mask, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="sample index"):
        JointObjective(mask_token_id=MASK, block_size=4).prepare(tokens, labels, loss_mask, [0, 1])
    with pytest.raises(ValueError, match="ar, joint"):
        build_objective("diffusion")
    with pytest.raises(ValueError, match="per_microbatch"):
        ARObjective(normalization="global")
