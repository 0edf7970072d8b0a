"""Core attention for the structured NLD masks, as a drop-in for megatron's DotProductAttention.

The mask logic itself lives in :mod:`nld_train.objective.masks` (one predicate). Here it becomes
either a dense boolean mask for SDPA (CPU training, reference) or a FlexAttention BlockMask that
skips fully masked tiles (CUDA). Megatron hands ``attention_mask`` through its layers untouched,
so we pass an :class:`AttentionInputs` object that also carries the per-position query scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from nld_train.dist import capabilities
from nld_train.objective.masks import causal_mask_mod, joint_attention_mask, joint_mask_mod


@dataclass
class AttentionInputs:
    kind: str                              # "causal" or "joint"
    dense: Optional[torch.Tensor] = None   # [S, S] bool, True = may attend (SDPA path)
    block_mask: object = None              # FlexAttention BlockMask (flex path)
    query_scale: Optional[torch.Tensor] = None  # [S] fp32, Llama-4 scaling; None = 1


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def build_attention_inputs(kind: str, seq_len: int, block_size: int, backend: str, device,
                           query_scale: Optional[torch.Tensor] = None) -> AttentionInputs:
    """Masks for one layout. ``seq_len`` is L (the joint layout has 2L tokens)."""
    if kind == "causal":  # stage 1: plain causal over L tokens, SDPA's own causal kernel
        return AttentionInputs("causal", query_scale=query_scale)
    if kind != "joint":
        raise ValueError(f"unknown attention kind {kind!r}")
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(joint_mask_mod(seq_len, block_size), None, None, 2 * seq_len,
                               2 * seq_len, device=device)
        return AttentionInputs("joint", block_mask=bm, query_scale=query_scale)
    return AttentionInputs("joint", dense=joint_attention_mask(seq_len, block_size, device=device),
                           query_scale=query_scale)


def attend(q, k, v, spec: AttentionInputs, scale=None, compiled_flex: bool = False):
    """q [b, h, s, d], k/v [b, g, s, d] (GQA) -> [b, h, s, d]."""
    if spec.query_scale is not None:
        q = q * spec.query_scale.to(q.dtype)[None, None, :, None]
    if spec.block_mask is not None:
        if compiled_flex:
            return _compiled_flex()(q, k, v, block_mask=spec.block_mask, scale=scale, enable_gqa=True)
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=spec.block_mask, scale=scale, enable_gqa=True)
    if spec.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense, scale=scale, enable_gqa=True)


class NLDCoreAttention(MegatronModule):
    """DotProductAttention's constructor and call signature; SDPA or FlexAttention inside."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **unused):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("attention dropout is not supported by NLDCoreAttention")
        self.softmax_scale = softmax_scale
        self.compiled_flex = capabilities().cuda  # eager flex materialises the scores; compile on GPU

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by the NLD attention")
        if not isinstance(attention_mask, AttentionInputs):
            raise TypeError("NLDCoreAttention expects an AttentionInputs object as attention_mask")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s,b,h,d] -> [b,h,s,d]
        out = attend(q, k, v, attention_mask, self.softmax_scale, self.compiled_flex)
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)  # [s, b, h*d]
