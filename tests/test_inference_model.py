"""The plain inference decoder against the megatron training model, and its KV cache."""
import pytest
import torch

from nld_train.config import ModelConfig, ParallelConfig, RopeScalingConfig
from nld_train.inference import KVCache, from_megatron
from nld_train.inference import masks as M
from nld_train.objective.masks import joint_attention_mask

MICRO = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             vocab_size=1000, make_vocab_size_divisible_by=128, max_position_embeddings=256, mask_token_id=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(dist1):
    """A megatron model (YaRN + query scaling, padded vocab) and its plain copy."""
    from nld_train.model.gpt import build_model
    m = ModelConfig(**MICRO, rope_scaling=RopeScalingConfig(type="yarn", factor=4.0,
                                                            original_max_position_embeddings=16),
                    query_scaling_beta=0.1)
    mg = build_model(m, ParallelConfig(), 64, seed=3).eval()
    with torch.no_grad():  # norms at 1 hide a swapped norm weight: make them distinct
        for n, p in mg.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return mg, m, from_megatron(mg, m, eos_token_id=0)


@torch.no_grad()
def test_causal_and_joint_logits_equal_megatron(pair):
    mg, m, plain = pair
    L, B = 32, 8
    assert plain.lm_head.weight.shape[0] == m.vocab_size  # padded vocabulary rows are gone
    ids = torch.randint(0, m.vocab_size, (2, 2 * L))
    pos = torch.arange(L)[None].expand(2, -1)
    ref = mg.full_logits(ids[:, :L], pos, mg.attention_inputs("causal", L, B, "cpu"))
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(2, 1, L, L)
    out = plain(ids[:, :L], pos, causal)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4
    pos_j = torch.arange(L).repeat(2)[None].expand(2, -1)      # both halves at 0..L-1
    ref = mg.full_logits(ids, pos_j, mg.attention_inputs("joint", L, B, "cpu"))
    out = plain(ids, pos_j, joint_attention_mask(L, B)[None, None].expand(2, 1, 2 * L, 2 * L))
    assert (out - ref).abs().max() < 1e-4


@torch.no_grad()
def test_cached_incremental_equals_full_forward(pair):
    _, m, plain = pair
    L, P = 24, 9
    ids = torch.randint(0, m.vocab_size, (2, L))
    pos = torch.arange(L)[None].expand(2, -1)
    full = plain(ids, pos, M.causal_mask(torch.ones(2, 0, dtype=torch.bool), L))
    cache = plain.new_cache(2, capacity=4)          # small: exercises growth
    steps = [plain.causal_pass(ids[:, :P], cache)]
    for t in range(P, L):
        steps.append(plain.causal_pass(ids[:, t:t + 1], cache))
    assert cache.slots == L and cache.lengths().tolist() == [L, L]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_left_padding_and_cache_gaps_change_nothing(pair):
    """A left-padded row, and a cache with holes (rejected drafts), give the unpadded row's logits."""
    _, m, plain = pair
    ids = torch.randint(2, m.vocab_size, (1, 10))
    pad = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    c1, c2 = plain.new_cache(1), plain.new_cache(1)
    a = plain.causal_pass(ids[:, :6], c1)
    b = plain.causal_pass(pad[:, :11], c2, valid[:, :11])
    assert (a - b[:, 5:]).abs().max() < 1e-5
    plain.causal_pass(torch.randint(2, m.vocab_size, (1, 3)), c2)   # a rejected draft ...
    c2.crop(c2.lengths() - 3)                                     # ... cropped away
    plain.causal_pass(torch.randint(2, m.vocab_size, (1, 2)), c2)   # then part of another
    c2.crop(c2.lengths() - 2)
    assert c2.slots == 11 and c2.lengths().item() == 6
    a = plain.causal_pass(ids[:, 6:], c1)
    b = plain.causal_pass(ids[:, 6:], c2)
    assert (a - b).abs().max() < 1e-5


def test_cache_crop_and_compact_per_row():
    c = KVCache(num_layers=1, batch=2, groups=1, head_dim=2, dtype=torch.float32, device="cpu", capacity=2)
    c.reserve(6)
    c.k[0][:, 0, :6, 0] = torch.arange(6.0)
    c.commit(6, valid=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))
    c.crop(torch.tensor([2, 4]))
    assert c.slots == 4 and c.lengths().tolist() == [2, 4]
    c.compact()  # nothing to gain: row 1 uses all 4 slots
    assert c.slots == 4
    c.crop(torch.tensor([2, 1]))
    assert c.slots == 3 and c.key_valid().tolist() == [[False, True, True], [True, False, False]]
    c.compact()
    assert c.slots == 2 and c.key_valid().tolist() == [[True, True], [False, True]]
    assert c.k[0][0, 0, :2, 0].tolist() == [1.0, 2.0] and c.k[0][1, 0, 1, 0].item() == 0.0


def test_quadratic_mask_matches_spec_predicate():
    B = 3
    W = B + 1
    mask = M.quadratic_mask(torch.ones(1, 2, dtype=torch.bool), B)[0, 0]
    assert mask[:, :2].all()  # everything sees the cache
    n = B * W
    for q in range(n):
        for k in range(n):
            spec = (k % W == 0 and k <= q) or (q % W != 0 and k // W == q // W)
            assert bool(mask[q, 2 + k]) == spec, (q, k)


def test_loader_rejects_other_folders(tmp_path):
    from nld_train.inference import load_model
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="HF export"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not an nld-train checkpoint"):
        load_model(tmp_path.parent)


@torch.no_grad()
def test_denoise_pass_equals_training_noisy_block(pair):
    """A bidirectional block pass over a cached clean prefix gives the logits the training joint
    layout gives that noisy block (it sees clean blocks strictly before it and itself)."""
    mg, m, plain = pair
    L, B, k = 32, 8, 2
    clean = torch.randint(2, m.vocab_size, (1, L))
    noisy = torch.where(torch.rand(1, L) < 0.5, torch.full_like(clean, m.mask_token_id), clean)
    pos_j = torch.arange(L).repeat(2)[None]
    ref = mg.full_logits(torch.cat([noisy, clean], 1), pos_j, mg.attention_inputs("joint", L, B, "cpu"))
    cache = plain.new_cache(1)
    plain.causal_pass(clean[:, : k * B], cache)
    out = plain.block_pass(noisy[:, k * B:(k + 1) * B], cache)
    assert (out - ref[:, k * B:(k + 1) * B]).abs().max() < 1e-4
