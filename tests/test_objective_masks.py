import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from nld_train.objective.masks import causal_attention_mask, causal_mask_mod, joint_attention_mask, joint_mask_mod

REFERENCE_4_2 = ["11000000", "11000000", "00111100", "00111100",
                 "00001000", "00001100", "00001110", "00001111"]


def brute_force(L, B):
    """The spec §1.4 predicate, written independently with plain ints."""
    rows = []
    for q in range(2 * L):
        row = []
        for k in range(2 * L):
            q_clean, k_clean = q >= L, k >= L
            bq = (q - L if q_clean else q) // B
            bk = (k - L if k_clean else k) // B
            if not q_clean and not k_clean:
                ok = bq == bk
            elif not q_clean and k_clean:
                ok = bq > bk
            elif q_clean and k_clean:
                ok = q >= k
            else:
                ok = False
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows)


def test_reference_matrix():
    expected = torch.tensor([[c == "1" for c in r] for r in REFERENCE_4_2])
    m = joint_attention_mask(4, 2)
    assert m.dtype == torch.bool and m.shape == (8, 8)
    assert torch.equal(m, expected)


def test_random_sizes_match_brute_force():
    rng = random.Random(0)
    for _ in range(12):
        B = rng.randint(1, 8)
        L = B * rng.randint(1, 6)
        assert torch.equal(joint_attention_mask(L, B), brute_force(L, B)), (L, B)


def test_structure():
    L, B = 16, 4
    m = joint_attention_mask(L, B)
    assert not m[L:, :L].any()                      # clean half never sees noisy tokens
    assert torch.equal(m[L:, L:], causal_attention_mask(L))
    assert m.diagonal().all()                       # every query sees itself (no empty rows)
    for blk in range(L // B):                       # noisy block never sees its own clean copy
        s = slice(blk * B, (blk + 1) * B)
        assert not m[s, L + blk * B:L + (blk + 1) * B].any()


def test_causal_mask():
    assert torch.equal(causal_attention_mask(3).int(), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]))


@pytest.mark.parametrize("L,B", [(6, 4), (0, 2), (4, 0), (-4, 2)])
def test_invalid_sizes(L, B):
    with pytest.raises(ValueError, match=str(L)):
        joint_attention_mask(L, B)
    with pytest.raises(ValueError):
        joint_mask_mod(L, B)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_flex_attention_matches_dense(heads, kv_heads):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    L, B, d = 64, 16, 16
    torch.manual_seed(0)
    q = torch.randn(2, heads, 2 * L, d)
    k, v = torch.randn(2, kv_heads, 2 * L, d), torch.randn(2, kv_heads, 2 * L, d)
    gqa = heads != kv_heads
    block_mask = fa.create_block_mask(joint_mask_mod(L, B), None, None, 2 * L, 2 * L, device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = fa.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_attention_mask(L, B), enable_gqa=gqa)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_mask_mod_matches_dense():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    i = torch.arange(32)
    assert torch.equal(causal_mask_mod(None, None, i[:, None], i[None, :]), causal_attention_mask(32))
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    bm = fa.create_block_mask(causal_mask_mod, None, None, 32, 32, device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fa.flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-5, rtol=1e-5)
