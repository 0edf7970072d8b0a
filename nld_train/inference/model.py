"""A plain PyTorch Llama/Mistral-shaped decoder with a KV cache, for decoding.

Depends only on torch and the pure-tensor helpers in :mod:`nld_train.model.rope`, so this file (and
the decoding code next to it) can later ship as the remote code of an HF export. Parameter names are
the HF Llama/Mistral ones (``model.layers.N.self_attn.q_proj.weight`` ...), so an export is a plain
``state_dict()``.

The model does not decide who may attend whom: every forward takes an explicit boolean mask
``[b, 1, s, S + s]`` over ``[cache slots ; new tokens]`` (True = may attend). The decoding modes
build those masks (:mod:`nld_train.inference.masks`); the model only rotates, scales and attends.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nld_train.model.rope import query_scale, rope_inv_freq


@dataclass
class NLDConfig:
    """Shape and token ids of an NLD model (HF Llama/Mistral field names)."""
    vocab_size: int = 8192                 # true vocabulary (padded rows are dropped on load)
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None         # None = hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None or a dict with the RopeScalingConfig fields (type, factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim)
    rope_scaling: Optional[dict] = None
    # Llama-4 query scaling 1 + beta * ln(1 + floor(pos / original_max)); None = off
    query_scaling_beta: Optional[float] = None
    max_position_embeddings: int = 4096
    mask_token_id: int = 1
    eos_token_id: Optional[int] = 0
    block_size: int = 32                   # training block size (decoding default comes from the call)
    attention_bias: bool = False           # biases on q/k/v (Qwen2 family); o_proj never has one

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def to_dict(self) -> dict:
        return asdict(self)

    def rope_scaling_params(self):
        """``rope_scaling`` with its defaults filled in, as :func:`rope_inv_freq` takes it (None: plain RoPE)."""
        if not self.rope_scaling or self.rope_scaling.get("type", "none") == "none":
            return None
        defaults = dict(type="none", factor=1.0, original_max_position_embeddings=0, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
        return SimpleNamespace(**{**defaults, **self.rope_scaling})


class KVCache:
    """Per-layer keys/values ``[b, groups, slots, head_dim]`` plus a per-row validity mask.

    All rows of a batch share one slot index space (slot ``i`` of every row is written by the same
    forward), but each row says which of its slots hold real tokens (``valid [b, slots]``). Left
    padding, and rows of a speculative batch that accepted fewer draft tokens than others, simply
    leave invalid slots: RoPE is applied before a key is stored, so a key's position is baked into
    it and gaps between slots change nothing but memory. A row's logical length (= the position of
    its next token) is its number of valid slots.

    Storage grows by doubling. A forward writes its new keys at ``[slots, slots + s)`` (scratch
    space); only :meth:`commit` makes them part of the cache, so a forward that must not update the
    cache (bidirectional drafts) costs no copy.
    """

    def __init__(self, num_layers: int, batch: int, groups: int, head_dim: int, dtype, device,
                 capacity: int = 256):
        self.num_layers, self.batch, self.groups, self.head_dim = num_layers, batch, groups, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.slots = 0
        self._alloc(capacity)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)

    def _alloc(self, capacity: int) -> None:
        shape = (self.batch, self.groups, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` slots in total (keeps the contents)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity)
        old_k, old_v, old_valid = self.k, self.v, self.valid
        self._alloc(cap)
        for i in range(self.num_layers):
            self.k[i][:, :, : self.slots] = old_k[i][:, :, : self.slots]
            self.v[i][:, :, : self.slots] = old_v[i][:, :, : self.slots]
        self.valid = torch.zeros(self.batch, cap, dtype=torch.bool, device=self.device)
        self.valid[:, : self.slots] = old_valid[:, : self.slots]

    def write_scratch(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write new keys/values after the committed slots; return keys/values over all of them."""
        s = k.shape[2]
        self.k[layer][:, :, self.slots: self.slots + s] = k
        self.v[layer][:, :, self.slots: self.slots + s] = v
        return self.k[layer][:, :, : self.slots + s], self.v[layer][:, :, : self.slots + s]

    def commit(self, num_new: int, valid: Optional[torch.Tensor] = None,
               select: Optional[torch.Tensor] = None) -> None:
        """Make scratch entries part of the cache.

        ``select`` (1-D indices into the ``num_new`` scratch entries) keeps only those, moved to the
        front (the quadratic decoder stores one anchor per group); ``valid [b, kept]`` marks which of
        the kept entries are real for each row (default: all).
        """
        if select is not None:
            idx = select.to(self.device) + self.slots
            for i in range(self.num_layers):
                self.k[i][:, :, self.slots: self.slots + len(select)] = self.k[i].index_select(2, idx)
                self.v[i][:, :, self.slots: self.slots + len(select)] = self.v[i].index_select(2, idx)
            num_new = len(select)
        self.valid[:, self.slots: self.slots + num_new] = True if valid is None else valid.to(self.device)
        self.slots += num_new

    def lengths(self) -> torch.Tensor:
        """Logical length per row [b] = number of valid slots = position of the next token."""
        return self.valid[:, : self.slots].sum(1)

    def key_valid(self) -> torch.Tensor:
        """[b, slots] bool: which committed slots each row may attend."""
        return self.valid[:, : self.slots]

    def crop(self, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[r]`` real tokens of row r (rejected drafts are dropped).

        Slots past the last one any row still uses are released for the next forward.
        """
        lengths = torch.as_tensor(lengths, device=self.device).view(-1, 1)
        valid = self.valid[:, : self.slots]
        valid &= valid.cumsum(1) <= lengths
        used = valid.any(0).nonzero()
        self.slots = int(used.max()) + 1 if used.numel() else 0
        self.valid[:, self.slots:] = False

    def compact(self) -> None:
        """Remove the gaps: every row's real tokens moved to the right end (left padding again).

        Purely a memory/compute optimisation; attention results do not depend on slot order.
        """
        valid = self.valid[:, : self.slots]
        n = int(valid.sum(1).max()) if self.slots else 0
        if n == self.slots:
            return
        # stable order: invalid slots first, then the real ones in their original order
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, self.slots - n:]
        for i in range(self.num_layers):
            idx = order[:, None, :, None].expand(-1, self.groups, -1, self.head_dim)
            self.k[i][:, :, :n] = self.k[i][:, :, : self.slots].gather(2, idx)
            self.v[i][:, :, :n] = self.v[i][:, :, : self.slots].gather(2, idx)
        new_valid = valid.gather(1, order)
        self.valid[:] = False
        self.valid[:, :n] = new_valid
        self.slots = n


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # computed in fp32 like torch.nn.RMSNorm under autocast / megatron's norm (bf16 inputs)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(out.dtype)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE (megatron's default, HF ``rotate_half``)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: NLDConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.ng, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.ng * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.ng * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, qscale, attn_mask, cache: Optional[KVCache]):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if qscale is not None:  # Llama-4 temperature on queries only (keys are cached unscaled)
            q = q * qscale[:, None, :, None].to(q.dtype)
        if cache is not None:
            k, v = cache.write_scratch(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: NLDConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: NLDConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, qscale, attn_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, qscale, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: NLDConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDModel(nn.Module):
    """The decoder. The decoding modes are mixed in by :class:`nld_train.inference.decoding.NLDForDecoding`."""

    def __init__(self, cfg: NLDConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # fp32 frequencies, as in megatron; angles are formed in fp32 and cast per forward
        self.register_buffer("inv_freq", self._fp32_inv_freq(), persistent=False)

    def _fp32_inv_freq(self, device=None) -> torch.Tensor:
        c = self.config
        return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_params()).to(device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .bfloat16() / .half() cast floating buffers too. A bf16 inv_freq is off by up
        # to 2^-9 relative, i.e. ~4 rad at position 2000 for the highest frequency: decoding long
        # prompts in bf16 gave wrong tokens. Whatever the module dtype, the frequencies stay the
        # fp32 values computed from the config (recomputed, not cast back: the bf16 copy is lossy).
        super()._apply(fn, recurse)
        self.inv_freq = self._fp32_inv_freq(self.inv_freq.device)
        return self

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, self.dtype,
                       self.device, capacity)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                update_cache: bool = False, logits_to_keep: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` (the last ``logits_to_keep`` positions if > 0).

        ``return_hidden``: the final-normed hidden states instead; ``lm_head`` then gives the logits
        of just the positions a caller needs (the quadratic decoder reads few of its B(B+1)).

        ``attn_mask [b, 1, s, S + s]`` bool over ``[committed cache slots ; new tokens]``, True =
        may attend; None = full attention. With ``update_cache`` all ``s`` new tokens are committed
        to the cache as real; for finer control call with ``update_cache=False`` and
        ``cache.commit(...)`` afterwards (the new keys stay in the cache's scratch space).
        """
        b, s = input_ids.shape
        if cache is not None:
            cache.reserve(cache.slots + s)
        x = self.model.embed_tokens(input_ids)
        # angles in fp32 (positions up to ~1e6 need it), then cos/sin in the compute dtype
        ang = position_ids.to(torch.float32)[..., None] * self.inv_freq.float()
        ang = torch.cat([ang, ang], -1)[:, None]                       # [b, 1, s, d]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        qscale = None
        c = self.config
        if c.query_scaling_beta:
            orig = (c.rope_scaling or {}).get("original_max_position_embeddings", 0)
            qscale = query_scale(position_ids, c.query_scaling_beta, orig)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool tensor (True = may attend)")
        for layer in self.model.layers:
            x = layer(x, cos, sin, qscale, attn_mask, cache)
        if cache is not None and update_cache:
            cache.commit(s)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: NLDConfig, seed: int = 0, std: float = 0.02, dtype=torch.float32):
        """Random weights (tests): normal(0, std) everywhere, norms at 1 (plus a small jitter)."""
        g = torch.Generator().manual_seed(seed)
        m = cls(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=g))
        return m.to(dtype)
