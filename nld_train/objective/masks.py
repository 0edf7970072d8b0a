"""Attention masks for the AR layout [x] and the joint layout [x_t ; x_0] (spec §1.4).

One predicate, :func:`joint_allowed`, defines the joint mask; the dense mask (SDPA, CPU) and the
FlexAttention ``mask_mod`` (CUDA) both call it, so training and inference cannot drift apart.

Packed sequences (several SFT conversations in one row) add one more predicate,
:func:`packed_allowed`: the layout's rule AND "query and key belong to the same document". Both
halves of the joint layout carry the same document ids (position ``i`` and ``L + i`` are the same
token), so a conversation never sees another one, noisy or clean. Again the dense mask and the
``mask_mod`` both call it.
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


def _check_documents(document_ids: torch.Tensor) -> None:
    if document_ids.dim() != 2 or document_ids.dtype in (torch.bool, torch.float16, torch.bfloat16,
                                                         torch.float32, torch.float64):
        raise ValueError(f"document_ids must be an integer tensor [b, L], got {document_ids.dtype} "
                         f"{tuple(document_ids.shape)}")


def packed_allowed(kind: str, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   document_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """True where query ``q`` of row ``b`` may attend key ``k`` in a packed row.

    ``kind`` is "causal" (L tokens) or "joint" (2L tokens, :func:`joint_allowed`); ``document_ids``
    [batch, L] gives each token's document (any integer; padding is one more document). Elementwise
    ops and one gather only, so the same body serves broadcast aranges and FlexAttention.
    """
    n = document_ids.shape[-1]
    if kind == "joint":
        layout = joint_allowed(q, k, n, block_size)
    elif kind == "causal":
        layout = q >= k
    else:
        raise ValueError(f"unknown attention kind {kind!r}")
    return layout & (document_ids[b, q % n] == document_ids[b, k % n])


def packed_attention_mask(kind: str, document_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense bool mask [batch, S, S] (S = L causal, 2L joint); True = query (row) may attend key."""
    _check_documents(document_ids)
    n = document_ids.shape[1]
    if kind == "joint":
        _check(n, block_size)
    s = 2 * n if kind == "joint" else n
    dev = document_ids.device
    b = torch.arange(document_ids.shape[0], device=dev)[:, None, None]
    idx = torch.arange(s, device=dev)
    return packed_allowed(kind, b, idx[None, :, None], idx[None, None, :], document_ids, block_size)


def packed_mask_mod(kind: str, document_ids: torch.Tensor, block_size: int):
    """FlexAttention ``mask_mod`` for packed rows (use with ``create_block_mask(..., B=batch)``)."""
    _check_documents(document_ids)
    if kind == "joint":
        _check(document_ids.shape[1], block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        return packed_allowed(kind, b, q_idx, kv_idx, document_ids, block_size)

    return mask_mod
