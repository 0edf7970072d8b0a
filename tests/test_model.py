"""The megatron model against an independent plain-PyTorch Llama forward (fp32, CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nld_train.config import ModelConfig, ParallelConfig, RopeScalingConfig
from nld_train.objective.masks import causal_attention_mask, joint_attention_mask

MICRO = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             vocab_size=1000, make_vocab_size_divisible_by=128, max_position_embeddings=256, mask_token_id=1)


def build(dist1, **kw):
    from nld_train.model.gpt import build_model
    m = ModelConfig(**{**MICRO, **kw})
    return build_model(m, ParallelConfig(), 64, seed=7), m


def reference_logits(model, m, ids, pos, allowed, qscale=None):
    """Llama forward written from scratch over the megatron parameters."""
    P = dict(model.named_parameters())
    nh, ng, hid = m.num_attention_heads, m.num_query_groups, m.hidden_size
    hd, rep = hid // nh, nh // ng
    inv = model.rotary_pos_emb.inv_freq
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + m.norm_epsilon) * w  # noqa: E731
    ang = pos[:, None, :, None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rope = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin  # noqa: E731
    x = P["embedding.word_embeddings.weight"][ids]
    b, s, _ = x.shape
    for i in range(m.num_layers):
        w = lambda n: P[f"decoder.layers.{i}.{n}.weight"]  # noqa: B023,E731
        qkv = (rms(x, w("input_layernorm")) @ w("self_attention.linear_qkv").T).view(b, s, ng, (rep + 2) * hd)
        q, k, v = qkv.split([rep * hd, hd, hd], -1)  # megatron QKV rows: per group [q x rep, k, v]
        q, k, v = rope(q.reshape(b, s, nh, hd).transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
        if qscale is not None:
            q = q * qscale[None, None, :, None]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + (a @ v).transpose(1, 2).reshape(b, s, hid) @ w("self_attention.linear_proj").T
        g, u = (rms(x, w("pre_mlp_layernorm")) @ w("mlp.linear_fc1").T).chunk(2, -1)
        x = x + (F.silu(g) * u) @ w("mlp.linear_fc2").T
    return (rms(x, P["decoder.final_layernorm.weight"]) @ P["output_layer.weight"].T)[..., : m.vocab_size]


@torch.no_grad()
def test_causal_and_joint_forward_match_reference(dist1):
    model, m = build(dist1)
    L, B = 32, 8
    ids = torch.randint(0, m.vocab_size, (2, 2 * L))
    pos_c = torch.arange(L)[None].expand(2, -1)
    out = model.full_logits(ids[:, :L], pos_c, model.attention_inputs("causal", L, B, "cpu"))
    ref = reference_logits(model, m, ids[:, :L], pos_c, causal_attention_mask(L))
    assert out.shape == (2, L, m.vocab_size)
    assert (out - ref).abs().max() < 1e-4
    pos_j = torch.arange(L).repeat(2)[None].expand(2, -1)  # 0..L-1 twice
    out = model.full_logits(ids, pos_j, model.attention_inputs("joint", L, B, "cpu"))
    ref = reference_logits(model, m, ids, pos_j, joint_attention_mask(L, B))
    assert (out - ref).abs().max() < 1e-4
    # the clean half of the joint layout is exactly the causal model on the clean tokens
    causal = model.full_logits(ids[:, L:], pos_c, model.attention_inputs("causal", L, B, "cpu"))
    assert (out[:, L:] - causal).abs().max() < 1e-4


@torch.no_grad()
def test_flex_block_mask_equals_dense_path(dist1):
    from nld_train.model.attention import build_attention_inputs
    model, m = build(dist1)
    L, B = 64, 16
    ids = torch.randint(0, m.vocab_size, (2, 2 * L))
    pos = torch.arange(L).repeat(2)[None].expand(2, -1)
    dense = model.full_logits(ids, pos, build_attention_inputs("joint", L, B, "sdpa", "cpu"))
    flex = model.full_logits(ids, pos, build_attention_inputs("joint", L, B, "flex", "cpu"))
    assert (dense - flex).abs().max() < 1e-4


def test_padded_vocab_never_counts(dist1):
    from nld_train.config import padded_vocab_size
    model, m = build(dist1)
    assert padded_vocab_size(m, 1) == 1024 and model.output_layer.weight.shape[0] == 1024
    with torch.no_grad():  # make padded rows win every argmax and dominate the softmax if they leaked
        model.output_layer.weight[m.vocab_size:] = 50.0
    L = 16
    ids = torch.randint(0, m.vocab_size, (2, L))
    pos = torch.arange(L)[None].expand(2, -1)
    attn = model.attention_inputs("causal", L, 1, "cpu")
    ce = model(ids, pos, attn, labels=ids)
    logits = model.full_logits(ids, pos, attn)
    ref = F.cross_entropy(logits.reshape(-1, m.vocab_size), ids.reshape(-1), reduction="none").view(2, L)
    assert torch.allclose(ce, ref, atol=1e-5)
    assert logits.argmax(-1).max() < m.vocab_size
    ce.sum().backward()
    assert model.output_layer.weight.grad[m.vocab_size:].abs().max() == 0


def test_yarn_frequencies_match_transformers():
    from transformers import MistralConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nld_train.model.rope import rope_inv_freq
    sc = RopeScalingConfig(type="yarn", factor=16.0, original_max_position_embeddings=16384)
    hf = MistralConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=262144,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                        "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    inv_hf, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = rope_inv_freq(128, 1e6, sc)
    assert attn_factor == pytest.approx(1.0)
    assert torch.allclose(ours, inv_hf.float(), rtol=1e-6)
    assert not torch.allclose(ours, rope_inv_freq(128, 1e6, None))


@torch.no_grad()
def test_query_scaling_uses_each_halfs_positions(dist1):
    from nld_train.model.rope import query_scale
    sc = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=8)
    model, m = build(dist1, rope_scaling=sc, query_scaling_beta=0.1)
    L, B = 32, 8
    ids = torch.randint(0, m.vocab_size, (1, 2 * L))
    pos = torch.arange(L).repeat(2)[None]
    qs = query_scale(pos[0], 0.1, 8)
    assert qs[0] == 1 and qs[L] == 1 and qs[L - 1] > 1  # both halves restart at position 0
    out = model.full_logits(ids, pos, model.attention_inputs("joint", L, B, "cpu"))
    ref = reference_logits(model, m, ids, pos, joint_attention_mask(L, B), qscale=qs)
    assert (out - ref).abs().max() < 1e-4
    no_scale = reference_logits(model, m, ids, pos, joint_attention_mask(L, B))
    assert (out - no_scale).abs().max() > 1e-4


def test_weights_moved_as_drawn_equal_the_cpu_initialisation(dist1):
    """Start-up on CUDA (nld_train.model.gpt.weights_drawn_on_cpu_then), TP=1; TP=2 runs in
    tests/mp_checks.py."""
    from tests.mp_checks import check_weights_moved_as_drawn
    check_weights_moved_as_drawn(ModelConfig(**MICRO), ParallelConfig())
