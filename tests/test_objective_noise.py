import math

import pytest
import torch

from nld_train.objective.noise import maskable_positions, noise_at_ratio, noise_seed, sample_noise

MASK = 100
EPS = 1e-3


def _tokens(b, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(MASK + 1, 1000, (b, L), generator=g)  # never equals the mask id


def test_p_constant_per_row_and_in_range():
    toks = _tokens(16, 64)
    nt = sample_noise(toks, torch.ones_like(toks, dtype=torch.bool), MASK, list(range(16)), EPS)
    assert nt.p.shape == (16,) and nt.p.dtype == torch.float32
    assert ((nt.p >= EPS) & (nt.p <= 1)).all()
    assert nt.noisy.dtype == torch.long and nt.masked.dtype == torch.bool
    assert torch.equal(nt.noisy == MASK, nt.masked)
    assert torch.equal(nt.noisy[~nt.masked], toks[~nt.masked])


def test_same_seeds_identical_different_seeds_differ():
    toks = _tokens(4, 256)
    allowed = torch.ones_like(toks, dtype=torch.bool)
    a = sample_noise(toks, allowed, MASK, [1, 2, 3, 4], EPS)
    b = sample_noise(toks, allowed, MASK, torch.tensor([1, 2, 3, 4]), EPS)
    c = sample_noise(toks, allowed, MASK, [5, 6, 7, 8], EPS)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.p, b.p)
    assert not torch.equal(a.masked, c.masked) and not torch.equal(a.p, c.p)


def test_never_masks_unmaskable():
    toks = _tokens(8, 128)
    allowed = torch.rand(8, 128, generator=torch.Generator().manual_seed(3)) < 0.5
    nt = sample_noise(toks, allowed, MASK, list(range(8)), EPS)
    assert not nt.masked[~allowed].any()
    assert nt.masked.any()


def test_masked_fraction_matches_p():
    L = 20000
    toks = _tokens(6, L)
    nt = sample_noise(toks, torch.ones_like(toks, dtype=torch.bool), MASK, [11, 12, 13, 14, 15, 16], EPS)
    for r in range(6):
        p = nt.p[r].item()
        frac = nt.masked[r].float().mean().item()
        assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / L) + 1e-9, (r, p, frac)


def test_mean_p():
    n = 4000
    toks = _tokens(n, 1)
    nt = sample_noise(toks, torch.ones_like(toks, dtype=torch.bool), MASK, [noise_seed(7, i) for i in range(n)], EPS)
    # t ~ U[0,1): E[p] = (1+eps)/2, std of p = (1-eps)/sqrt(12)
    assert abs(nt.p.mean().item() - (1 + EPS) / 2) < 4 * (1 - EPS) / math.sqrt(12 * n)


def test_row_depends_only_on_its_seed():
    toks = _tokens(4, 96)
    allowed = torch.ones_like(toks, dtype=torch.bool)
    seeds = [noise_seed(1234, i) for i in (3, 17, 5, 900)]
    batch = sample_noise(toks, allowed, MASK, seeds, EPS)
    for r in range(4):
        alone = sample_noise(toks[r:r + 1], allowed[r:r + 1], MASK, seeds[r:r + 1], EPS)
        assert torch.equal(alone.noisy[0], batch.noisy[r]) and torch.equal(alone.p[0], batch.p[r])


def test_validation():
    toks = _tokens(2, 8)
    allowed = torch.ones_like(toks, dtype=torch.bool)
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eps"):
            sample_noise(toks, allowed, MASK, [1, 2], eps)
    with pytest.raises(ValueError, match="seed"):
        sample_noise(toks, allowed, MASK, [1], EPS)


def test_maskable_positions():
    lm = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(maskable_positions(lm), expected)
    assert torch.equal(maskable_positions(lm.float()), expected)


def test_noise_seed_distinct_and_stable():
    seeds = [noise_seed(1234, i) for i in range(10000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert noise_seed(1234, 0) == noise_seed(1234, 0) == seeds[0]
    assert noise_seed(1235, 0) != seeds[0]


def test_noise_at_ratio_masks_that_fraction_nested_over_ratios():
    # validation at a fixed masking ratio t (scripts/ablations.py): p is t in every row, the
    # masked fraction is t, maskings at smaller t are subsets of those at larger t, and the same
    # seeds give the same positions sample_noise would compare its own p against
    toks = _tokens(8, 2048)
    allowed = torch.ones_like(toks, dtype=torch.bool)
    allowed[:, :16] = False
    seeds = list(range(8))
    prev = None
    for t in (0.25, 0.5, 0.75):
        nt = noise_at_ratio(toks, allowed, MASK, seeds, t)
        assert torch.equal(nt.p, torch.full((8,), t))
        assert not nt.masked[:, :16].any()
        assert torch.equal(nt.noisy == MASK, nt.masked)
        assert torch.equal(nt.noisy[~nt.masked], toks[~nt.masked])
        frac = nt.masked[:, 16:].float().mean().item()
        assert abs(frac - t) < 0.02, (t, frac)
        if prev is not None:
            assert not (prev & ~nt.masked).any()
        prev = nt.masked
    full = noise_at_ratio(toks, allowed, MASK, seeds, 1.0)
    assert torch.equal(full.masked, allowed)
    # the uniforms are sample_noise's: with its own per-row p, the same rows mask the same positions
    ref = sample_noise(toks, allowed, MASK, seeds, EPS)
    for r in range(8):
        again = noise_at_ratio(toks[r:r + 1], allowed[r:r + 1], MASK, seeds[r:r + 1], float(ref.p[r]))
        assert torch.equal(again.masked[0], ref.masked[r])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            noise_at_ratio(toks, allowed, MASK, seeds, bad)
