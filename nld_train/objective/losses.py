"""Loss sums, counts and their normalisation (spec §1.5, §1.6).

Per-token cross-entropy comes from the model (which handles tensor parallelism and the padded
vocabulary). Here each micro-batch is reduced to sums and counts; the trainer adds the counts over
the whole global batch (all micro-batches, all data-parallel ranks) so that the backward scalar
of every micro-batch is already divided by the GLOBAL count. Summing gradients then yields the
exact global token mean, whatever the micro-batch / data-parallel split.
"""
from __future__ import annotations

import torch

NORMALIZATIONS = ("combined", "separate", "per_microbatch")


def ar_sums(ce_clean: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_ar, N_ar) = (Σ ce·loss_mask, Σ loss_mask), fp32 0-dim tensors."""
    lm = loss_mask.to(device=ce_clean.device, dtype=torch.float32)
    # where() rather than a plain product: a non-finite CE at an ignored position must not leak
    # into the sum (0 * inf = nan).
    s = torch.where(lm != 0, ce_clean.float() * lm, torch.zeros_like(lm)).sum()
    return s, lm.sum()


def diffusion_sums(ce_noisy: torch.Tensor, masked: torch.Tensor,
                   p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_diff, N_masked) = (Σ_masked ce/p, #masked), fp32 0-dim tensors.

    Dividing by p makes the per-token term an unbiased ELBO weight: rows with few masks (small p)
    count as much in expectation as heavily masked rows.
    """
    m = masked.to(device=ce_noisy.device, dtype=torch.bool)
    w = ce_noisy.float() / p.to(device=ce_noisy.device, dtype=torch.float32)[:, None]
    s = torch.where(m, w, torch.zeros_like(w)).sum()
    return s, m.sum().float()


def _as_f32(*xs) -> list[torch.Tensor]:
    """Floats or tensors -> fp32 tensors on the device of the first tensor (keeps autograd)."""
    dev = next((x.device for x in xs if torch.is_tensor(x)), None)
    return [torch.as_tensor(x, dtype=torch.float32, device=dev) for x in xs]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den, and exactly 0 where den == 0 (an empty term contributes nothing, never NaN).

    The denominator is replaced by 1 before dividing so that no inf/nan appears even in the
    branch torch.where discards (it would otherwise poison the gradient).
    """
    nonzero = den > 0
    safe = torch.where(nonzero, den, torch.ones_like(den))
    return torch.where(nonzero, num / safe, torch.zeros_like(num))


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")


def _objective(s_ar, s_diff, n_ar, n_diff, alpha, ar_weight, separate: bool) -> torch.Tensor:
    if separate:
        return alpha * _ratio(s_diff, n_diff) + ar_weight * _ratio(s_ar, n_ar)
    return _ratio(alpha * s_diff + ar_weight * s_ar, n_diff + n_ar)


def normalized_loss(s_ar, s_diff, n_ar, n_diff, *, alpha: float, ar_weight: float,
                    normalization: str, n_microbatches: int = 1) -> torch.Tensor:
    """The scalar to backward for ONE micro-batch.

    ``s_ar``/``s_diff`` are this micro-batch's sums. For "combined" and "separate", ``n_ar`` and
    ``n_diff`` are the GLOBAL counts (whole global batch), so the micro-batch losses sum to the
    global objective. For "per_microbatch" (public Megatron recipe, for ablations) they are this
    micro-batch's OWN counts and the result is divided by ``n_microbatches`` (micro-batches per
    rank × data-parallel size): summed gradients then give the mean of per-micro-batch means.
    """
    _check_normalization(normalization)
    s_ar, s_diff, n_ar, n_diff = _as_f32(s_ar, s_diff, n_ar, n_diff)
    if normalization == "per_microbatch":
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
        return _objective(s_ar, s_diff, n_ar, n_diff, alpha, ar_weight, False) / n_microbatches
    return _objective(s_ar, s_diff, n_ar, n_diff, alpha, ar_weight, normalization == "separate")


def reported_losses(s_ar, s_diff, n_ar, n_diff, *, alpha: float, ar_weight: float,
                    normalization: str, has_diffusion: bool) -> dict:
    """Logged values from GLOBAL sums and counts (already reduced over the whole global batch).

    ``loss`` is the optimised objective (for per_microbatch, the combined global value: the
    per-micro-batch mean is not a property of the global batch), ``loss_ar`` the mean AR CE and,
    only when ``has_diffusion``, ``loss_diff`` = S_diff / N_masked before alpha. Empty terms read 0.
    """
    _check_normalization(normalization)
    with torch.no_grad():
        s_ar, s_diff, n_ar, n_diff = _as_f32(s_ar, s_diff, n_ar, n_diff)
        loss = _objective(s_ar, s_diff, n_ar, n_diff, alpha, ar_weight, normalization == "separate")
        out = {"loss": float(loss), "loss_ar": float(_ratio(s_ar, n_ar))}
        if has_diffusion:
            out["loss_diff"] = float(_ratio(s_diff, n_diff))
    return out
