"""Attention masks of the decoding forwards, over keys ``[committed cache slots ; new tokens]``.

Every builder returns a bool tensor ``[b, 1, s, S + s]`` (True = may attend) for
:meth:`NLDModel.forward`. The cache part is always the row's valid slots (left padding and
rejected drafts are invalid); the builders differ only in how the new tokens see each other:

- :func:`causal_mask`   prefill, AR step, verify, block KV-write (spec §3.0 a)
- :func:`block_mask`    bidirectional denoise / draft of one block (spec §3.0 b)
- :func:`prefix_block_mask`  the quadratic decoder's fused first pass: causal prompt + a bidirectional
  block that sees the whole prompt
- :func:`quadratic_mask`     the quadratic decoder's grouped draft layout (spec §3.5)

The training layout's predicate stays in :mod:`nld_train.objective.masks`; these are its inference
counterparts (a denoised block sees the clean past + itself, exactly what a noisy training block
sees; the clean stream is causal).
"""
from __future__ import annotations

from typing import Optional

import torch


def _with_cache(key_valid: torch.Tensor, new_part: torch.Tensor) -> torch.Tensor:
    """[b, S] cache validity + [b, s, s] (or [s, s]) new-token part -> [b, 1, s, S + s]."""
    b, s = key_valid.shape[0], new_part.shape[-1]
    new_part = new_part.expand(b, s, s)
    cache_part = key_valid[:, None, :].expand(b, s, key_valid.shape[1])
    return torch.cat([cache_part, new_part], -1)[:, None]


def causal_mask(key_valid: torch.Tensor, s: int, new_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New tokens attend the valid cache and earlier valid new tokens (and always themselves, so a
    left-padding query row is never empty: its output is unused, but must not be NaN)."""
    idx = torch.arange(s, device=key_valid.device)
    tri = idx[:, None] >= idx[None, :]
    new = tri[None] if new_valid is None else tri[None] & new_valid[:, None, :]
    new = new | torch.eye(s, dtype=torch.bool, device=key_valid.device)
    return _with_cache(key_valid, new)


def block_mask(key_valid: torch.Tensor, s: int) -> torch.Tensor:
    """A block of new tokens sees the valid cache and the whole block (bidirectional)."""
    return _with_cache(key_valid, torch.ones(s, s, dtype=torch.bool, device=key_valid.device))


def prefix_block_mask(key_valid: torch.Tensor, prompt_valid: torch.Tensor, block: int) -> torch.Tensor:
    """New tokens ``[prompt (P) ; block (B)]``: the prompt is causal (so its keys equal a plain
    prefill and can be kept), the block sees the valid prompt and the whole block."""
    b, P = prompt_valid.shape
    s = P + block
    dev = prompt_valid.device
    idx = torch.arange(s, device=dev)
    new_valid = torch.cat([prompt_valid, torch.ones(b, block, dtype=torch.bool, device=dev)], 1)
    causal = (idx[:, None] >= idx[None, :]) | (idx[:, None] >= P)   # block rows: everything
    new = (causal[None] & new_valid[:, None, :]) | torch.eye(s, dtype=torch.bool, device=dev)
    return _with_cache(key_valid, new)


def quadratic_allowed(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Spec §3.5 predicate among the B(B+1) draft tokens (group g = [anchor d_g, MASK x B]).

    Anchors (slot 0 of a group) form a causal chain over the earlier anchors; the masks of group g
    see the anchors d_0..d_g and their own group bidirectionally.
    """
    w = block + 1
    anchor_chain = (k % w == 0) & (k <= q)
    own_group = (q % w != 0) & (k // w == q // w)
    return anchor_chain | own_group


def quadratic_mask(key_valid: torch.Tensor, block: int) -> torch.Tensor:
    n = block * (block + 1)
    idx = torch.arange(n, device=key_valid.device)
    return _with_cache(key_valid, quadratic_allowed(idx[:, None], idx[None, :], block))
