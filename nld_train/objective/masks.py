"""Attention masks for the AR layout [x] and the joint layout [x_t ; x_0] (spec §1.4).

One predicate, :func:`joint_allowed`, defines the joint mask; the dense mask (SDPA, CPU) and the
FlexAttention ``mask_mod`` (CUDA) both call it, so training and inference cannot drift apart.
"""
from __future__ import annotations

import torch


def _check(seq_len: int, block_size: int) -> None:
    ok_types = isinstance(seq_len, int) and isinstance(block_size, int)
    if not ok_types or isinstance(seq_len, bool) or isinstance(block_size, bool):
        raise ValueError(f"seq_len and block_size must be ints, got seq_len={seq_len!r}, "
                         f"block_size={block_size!r}")
    if seq_len <= 0 or block_size <= 0:
        raise ValueError(f"seq_len and block_size must be positive, got seq_len={seq_len}, "
                         f"block_size={block_size}")
    if seq_len % block_size != 0:
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of block_size ({block_size})")


def joint_allowed(q: torch.Tensor, k: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """True where query index ``q`` may attend key index ``k`` in the 2L joint layout.

    ``q`` and ``k`` are broadcastable integer tensors in [0, 2L). Only elementwise tensor ops are
    used (no Python branching on values), so the same body works on broadcast aranges and inside
    FlexAttention's vmapped ``mask_mod``.
    """
    n, bs = seq_len, block_size
    cq, ck = q >= n, k >= n                   # which half: False = noisy x_t, True = clean x_0
    bq, bk = (q - n * cq) // bs, (k - n * ck) // bs  # block index within the own half
    noisy_own_block = ~cq & ~ck & (bq == bk)   # bidirectional inside the noisy block
    noisy_sees_past_clean = ~cq & ck & (bq > bk)  # strictly earlier clean blocks (not its own)
    clean_causal = cq & ck & (q >= k)          # clean half: plain token-causal -> AR loss
    return noisy_own_block | noisy_sees_past_clean | clean_causal


def joint_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Dense bool mask [2L, 2L]; True = query (row) may attend key (column). Contract name."""
    _check(seq_len, block_size)
    idx = torch.arange(2 * seq_len, device=device)
    return joint_allowed(idx[:, None], idx[None, :], seq_len, block_size)


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """Dense bool mask [L, L], lower triangle including the diagonal."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    idx = torch.arange(seq_len, device=device)
    return idx[:, None] >= idx[None, :]


def joint_mask_mod(seq_len: int, block_size: int):
    """FlexAttention ``mask_mod`` for the joint layout (use with ``create_block_mask``)."""
    _check(seq_len, block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        return joint_allowed(q_idx, kv_idx, seq_len, block_size)

    return mask_mod


def causal_mask_mod(b, h, q_idx, kv_idx):
    """FlexAttention ``mask_mod`` for plain causal attention."""
    return q_idx >= kv_idx
