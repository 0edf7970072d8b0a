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
from nld_train.objective.masks import (
    causal_attention_mask,
    joint_attention_mask,
    joint_mask_mod,
    packed_attention_mask,
    packed_mask_mod,
)


@dataclass
class AttentionInputs:
    kind: str                              # "causal" or "joint"
    dense: Optional[torch.Tensor] = None   # [S, S] or packed [b, 1, S, S] bool, True = may attend (SDPA)
    block_mask: object = None              # FlexAttention BlockMask (flex path)
    query_scale: Optional[torch.Tensor] = None  # [S] (packed: [b, S]) fp32, Llama-4 scaling; None = 1
    # joint SDPA: the clean half is plain causal and sees no noisy key (checked on ``dense``), so it
    # runs SDPA's causal kernel and only the noisy queries use the mask rows dense[:L]
    split_clean: bool = False


class FlexNotCompiledError(RuntimeError):
    """FlexAttention was about to run uncompiled where it must be compiled (CUDA)."""


def _flex_compiled_only(q, k, v, block_mask, scale):
    # While dynamo traces this frame ``is_compiling()`` is True and the branch folds away. The frame
    # runs eagerly only when dynamo gave up on it: past ``torch._dynamo.config.recompile_limit``
    # (8 graphs by default: one per shape x grad mode), or after a compile error that
    # ``config.suppress_errors`` swallowed. FlexAttention would then take its unfused path, which
    # materialises the fp32 [b, h, S, S] scores (8 GiB per 32 heads at S = 8192) and is many
    # times slower: a silent cliff, so stop here instead.
    if not torch.compiler.is_compiling():
        raise FlexNotCompiledError(
            f"FlexAttention fell back to eager (uncompiled) for q {tuple(q.shape)} {q.dtype} on {q.device}: "
            f"torch.compile gave up on it, most likely past torch._dynamo.config.recompile_limit "
            f"(now {torch._dynamo.config.recompile_limit}; every new shape or grad mode is one more graph). "
            "Raise that limit, call torch._dynamo.reset() between unrelated shapes, or see "
            "TORCH_LOGS=recompiles for the reason")
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


@functools.lru_cache(maxsize=None)
def _compiled_flex(backend: str = "inductor"):
    """FlexAttention under torch.compile that raises :class:`FlexNotCompiledError` rather than run
    uncompiled. ``backend`` other than inductor only for tests (eager traces without a compiler)."""
    return torch.compile(_flex_compiled_only, backend=backend, dynamic=False)


def _packed_block_mask(kind: str, document_ids: torch.Tensor, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask
    b, n = document_ids.shape
    s = 2 * n if kind == "joint" else n
    return create_block_mask(packed_mask_mod(kind, document_ids, block_size), b, None, s, s,
                             device=document_ids.device)


@functools.lru_cache(maxsize=None)
def _compiled_packed_block_mask(backend: str = "inductor"):
    # Eager create_block_mask evaluates the mask_mod on every (q, kv) pair through vmap and keeps
    # the [b, S, S] intermediates; torch.compile(create_block_mask) is torch's own advice (its
    # deprecated ``_compile`` flag says so) and fuses them. Packed rows need a new mask per
    # micro-batch, so the build is on the step's critical path (scripts/bench/attention.py
    # --mask-build-length times both). The document ids are a traced input: one graph per shape.
    return torch.compile(_packed_block_mask, backend=backend, dynamic=False)


BACKENDS = ("auto", "sdpa", "flex")


def select_backend(kind: str, caps=None) -> str:
    """The fastest correct backend for ``kind`` on this device (``caps``: :func:`capabilities`).

    Measured with ``scripts/bench/attention.py`` (docs/performance.md): the causal layout always
    uses SDPA's own causal kernel (flash on CUDA). The joint mask uses the compiled FlexAttention
    block mask on CUDA (fully masked tiles skipped: ~1/4 of the 2L x 2L tiles are computed) and
    masked SDPA on CPU (clean half with the causal kernel, noisy half with its mask rows), where
    FlexAttention has no backward and its eager forward materialises the scores (several times
    slower than SDPA).
    """
    caps = capabilities() if caps is None else caps
    if kind not in ("causal", "joint"):
        raise ValueError(f"unknown attention kind {kind!r}")
    return "flex" if kind == "joint" and caps.cuda else "sdpa"


def build_attention_inputs(kind: str, seq_len: int, block_size: int, backend: str, device,
                           query_scale: Optional[torch.Tensor] = None) -> AttentionInputs:
    """Masks for one layout. ``seq_len`` is L (the joint layout has 2L tokens). ``backend`` is one
    of :data:`BACKENDS`; "auto" = :func:`select_backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = select_backend(kind)
    if kind == "causal":  # stage 1: plain causal over L tokens, SDPA's own causal kernel
        return AttentionInputs("causal", query_scale=query_scale)
    if kind != "joint":
        raise ValueError(f"unknown attention kind {kind!r}")
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        bm = create_block_mask(joint_mask_mod(seq_len, block_size), None, None, 2 * seq_len,
                               2 * seq_len, device=device)
        return AttentionInputs("joint", block_mask=bm, query_scale=query_scale)
    dense = joint_attention_mask(seq_len, block_size, device=device)
    n = seq_len  # the predicate decides; the split is used only when its clean rows are plain causal
    split = not dense[n:, :n].any() and torch.equal(dense[n:, n:], causal_attention_mask(n, device=device))
    return AttentionInputs("joint", dense=dense, query_scale=query_scale, split_clean=bool(split))


def build_packed_attention_inputs(kind: str, document_ids: torch.Tensor, block_size: int, backend: str,
                                  query_scale: Optional[torch.Tensor] = None,
                                  compile_mask: Optional[str] = "auto") -> AttentionInputs:
    """Masks for packed rows (``document_ids`` [b, L]): the layout's mask restricted to each document
    (:func:`nld_train.objective.masks.packed_allowed`). Built per micro-batch, never cached.

    ``compile_mask`` (flex only): the torch.compile backend of the BlockMask builder; "auto" =
    inductor on CUDA, uncompiled elsewhere (inductor needs a C++ toolchain on CPU, and CPU training
    uses SDPA); None = uncompiled."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = select_backend(kind)
    if backend == "flex":
        if compile_mask == "auto":
            compile_mask = "inductor" if document_ids.is_cuda else None
        packed_mask_mod(kind, document_ids, block_size)  # its argument checks, outside the traced code
        build = _compiled_packed_block_mask(compile_mask) if compile_mask else _packed_block_mask
        return AttentionInputs(kind, block_mask=build(kind, document_ids, block_size), query_scale=query_scale)
    return AttentionInputs(kind, dense=packed_attention_mask(kind, document_ids, block_size)[:, None],
                           query_scale=query_scale)


def attend(q, k, v, spec: AttentionInputs, scale=None, compiled_flex: bool = False):
    """q [b, h, s, d], k/v [b, g, s, d] (GQA) -> [b, h, s, d].

    FlexAttention runs compiled when ``compiled_flex`` (and must on CUDA: uncompiled it
    materialises the scores; :class:`FlexNotCompiledError` otherwise); eager is for CPU, where
    compiling needs a toolchain and the eager forward is exact."""
    if spec.query_scale is not None:
        qs = spec.query_scale.to(q.dtype)
        q = q * (qs[:, None, :, None] if qs.dim() == 2 else qs[None, None, :, None])
    if spec.block_mask is not None:
        if compiled_flex:
            return _compiled_flex()(q, k, v, spec.block_mask, scale)
        if q.is_cuda:
            raise FlexNotCompiledError("FlexAttention on CUDA must run compiled (compiled_flex=True): "
                                       "eager flex materialises the [b, h, S, S] scores")
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=spec.block_mask, scale=scale, enable_gqa=True)
    if spec.kind == "causal" and spec.dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if spec.split_clean:  # ~1.3-2x faster than one dense [2L, 2L] call on CPU (docs/performance.md)
        n = q.shape[2] // 2
        clean = F.scaled_dot_product_attention(q[:, :, n:], k[:, :, n:], v[:, :, n:], is_causal=True,
                                               scale=scale, enable_gqa=True)
        noisy = F.scaled_dot_product_attention(q[:, :, :n], k, v, attn_mask=spec.dense[:n], scale=scale,
                                               enable_gqa=True)
        return torch.cat([noisy, clean], 2)
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
