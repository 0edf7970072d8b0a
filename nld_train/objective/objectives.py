"""Objectives: turn a data micro-batch into model inputs, and per-token CE back into sums.

The model is called as ``ce = model(input_ids, position_ids, attention=kind, targets)`` and
returns per-token cross-entropy [b, S] (S = L for AR, 2L for joint); everything else is here.

Packed rows (SFT: several conversations per row) also bring ``document_ids`` [b, L] and per-document
``position_ids`` [b, L]; the attention then never crosses documents (``masks.packed_allowed``) and
each conversation's positions start at 0, as if it were alone in its row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import NORMALIZATIONS, ar_sums, diffusion_sums
from .losses import normalized_loss as _normalized_loss
from .losses import reported_losses as _reported_losses
from .noise import maskable_positions, noise_seed, sample_noise


@dataclass
class Prepared:
    """One micro-batch ready for the model."""
    input_ids: torch.Tensor          # [b, S]
    position_ids: torch.Tensor       # [b, S]: 0..L-1 (twice for joint: each half its own)
    attention: str                   # "causal" or "joint"
    targets: torch.Tensor            # [b, S] target id per position (any valid id where unused)
    loss_mask: torch.Tensor          # [b, L] float, label-aligned AR mask
    masked: torch.Tensor | None      # [b, L] bool noisy positions (joint only)
    p: torch.Tensor | None           # [b] masking probability per row (joint only)
    n_ar: torch.Tensor               # 0-dim float: Σ loss_mask
    n_diff: torch.Tensor             # 0-dim float: number of masked positions (0 for AR)
    document_ids: torch.Tensor | None = None  # [b, L] packed rows: attention stays inside a document


def _check_batch(tokens, labels, loss_mask, sample_indices, document_ids=None, position_ids=None) -> None:
    if tokens.dim() != 2 or labels.shape != tokens.shape or loss_mask.shape != tokens.shape:
        raise ValueError(f"tokens, labels and loss_mask must all be [b, L], got {tuple(tokens.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}")
    if len(sample_indices) != tokens.shape[0]:
        raise ValueError(f"need one sample index per row: {len(sample_indices)} for {tokens.shape[0]} rows")
    if (document_ids is None) != (position_ids is None):
        raise ValueError("packed rows need both document_ids and position_ids (or neither)")
    for name, t in (("document_ids", document_ids), ("position_ids", position_ids)):
        if t is not None and t.shape != tokens.shape:
            raise ValueError(f"{name} must be [b, L] = {list(tokens.shape)}, got {list(t.shape)}")


def _positions(b: int, L: int, device, position_ids=None) -> torch.Tensor:
    if position_ids is not None:
        return position_ids.to(device=device, dtype=torch.long)
    return torch.arange(L, device=device).repeat(b, 1)


class Objective:
    """Base class: holds the loss weights and normalisation; subclasses build the inputs."""
    has_diffusion: bool = False

    def __init__(self, alpha: float, ar_weight: float, normalization: str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if alpha < 0 or ar_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got alpha={alpha}, ar_weight={ar_weight}")
        self.alpha, self.ar_weight, self.normalization = float(alpha), float(ar_weight), normalization

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        raise NotImplementedError

    def sums(self, ce: torch.Tensor, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def normalized_loss(self, s_ar, s_diff, n_ar, n_diff, n_microbatches: int = 1) -> torch.Tensor:
        return _normalized_loss(s_ar, s_diff, n_ar, n_diff, alpha=self.alpha, ar_weight=self.ar_weight,
                                normalization=self.normalization, n_microbatches=n_microbatches)

    def reported_losses(self, s_ar, s_diff, n_ar, n_diff) -> dict:
        return _reported_losses(s_ar, s_diff, n_ar, n_diff, alpha=self.alpha, ar_weight=self.ar_weight,
                                normalization=self.normalization, has_diffusion=self.has_diffusion)


class ARObjective(Objective):
    """Plain causal LM over L tokens (stage 1)."""

    def __init__(self, ar_weight: float = 1.0, normalization: str = "combined"):
        super().__init__(alpha=0.0, ar_weight=ar_weight, normalization=normalization)

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        _check_batch(tokens, labels, loss_mask, sample_indices, document_ids, position_ids)
        b, L = tokens.shape
        lm = loss_mask.to(device=tokens.device, dtype=torch.float32)
        return Prepared(input_ids=tokens, position_ids=_positions(b, L, tokens.device, position_ids),
                        attention="causal", targets=labels, loss_mask=lm, masked=None, p=None, n_ar=lm.sum(),
                        n_diff=torch.zeros((), device=tokens.device), document_ids=document_ids)

    def sums(self, ce, prepared):
        if ce.shape != prepared.loss_mask.shape:
            raise ValueError(f"expected per-token CE of shape [b, L] = {list(prepared.loss_mask.shape)}, "
                             f"got {list(ce.shape)}")
        s_ar, _ = ar_sums(ce, prepared.loss_mask)
        return s_ar, torch.zeros((), device=s_ar.device)


class JointObjective(Objective):
    """Joint AR + block diffusion over the 2L layout [x_t ; x_0] (stage 2, SFT)."""
    has_diffusion = True

    def __init__(self, mask_token_id: int, block_size: int, alpha: float = 0.3, ar_weight: float = 1.0,
                 eps: float = 1e-3, normalization: str = "combined", seed: int = 1234):
        super().__init__(alpha=alpha, ar_weight=ar_weight, normalization=normalization)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.mask_token_id, self.block_size, self.eps, self.seed = int(mask_token_id), block_size, eps, int(seed)

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        _check_batch(tokens, labels, loss_mask, sample_indices, document_ids, position_ids)
        b, L = tokens.shape
        if L % self.block_size != 0:
            raise ValueError(f"sequence length {L} must be a multiple of block_size {self.block_size}")
        # Seeds come from global sample indices, so noise does not depend on the batch split.
        seeds = [noise_seed(self.seed, int(i)) for i in sample_indices]
        maskable = maskable_positions(loss_mask, packed=document_ids is not None)
        nt = sample_noise(tokens, maskable, self.mask_token_id, seeds, self.eps)
        lm = loss_mask.to(device=tokens.device, dtype=torch.float32)
        pos = _positions(b, L, tokens.device, position_ids)
        return Prepared(
            input_ids=torch.cat([nt.noisy, tokens], dim=1),
            position_ids=torch.cat([pos, pos], dim=1),  # both halves 0..L-1 (same RoPE per half)
            attention="joint",
            # noisy half: the clean token at the SAME position (unshifted, spec §1.5);
            # clean half: the next token (standard AR).
            targets=torch.cat([tokens, labels], dim=1),
            loss_mask=lm, masked=nt.masked, p=nt.p, n_ar=lm.sum(), n_diff=nt.masked.sum().float(),
            document_ids=document_ids)

    def sums(self, ce, prepared):
        L = prepared.loss_mask.shape[1]
        if ce.shape != (prepared.loss_mask.shape[0], 2 * L):
            raise ValueError(f"expected per-token CE of shape [b, 2L] = "
                             f"{[prepared.loss_mask.shape[0], 2 * L]}, got {list(ce.shape)}")
        s_diff, _ = diffusion_sums(ce[:, :L], prepared.masked, prepared.p)
        # Unlike the public Megatron code, the AR term respects the loss mask (SFT prompts, padding).
        s_ar, _ = ar_sums(ce[:, L:], prepared.loss_mask)
        return s_ar, s_diff


_OBJECTIVES = {"ar": ARObjective, "joint": JointObjective}


def build_objective(name: str, **kwargs) -> Objective:
    """``build_objective("ar", ...)`` or ``build_objective("joint", mask_token_id=..., block_size=...)``."""
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name](**kwargs)
