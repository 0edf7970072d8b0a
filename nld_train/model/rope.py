"""Rotary frequencies (plain and YaRN) and Llama-4 query scaling, as plain tensor functions.

Shared by the megatron model and (later) the inference model and HF export, so all of them rotate
and scale identically.
"""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32; ``scaling`` is a RopeScalingConfig or None."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None or scaling.type == "none":
        return inv_freq.float()
    if scaling.type != "yarn":
        raise ValueError(f"unknown rope scaling {scaling.type!r}")
    if scaling.mscale != scaling.mscale_all_dim:
        # the attention factor would then differ from 1 and need scaling cos/sin; NLD uses 1/1
        raise ValueError("model.rope_scaling: mscale != mscale_all_dim is not supported")
    # YaRN: keep high frequencies (short wavelengths) as they are, interpolate the low ones by
    # `factor`, with a linear ramp between the dimensions given by beta_fast / beta_slow.
    orig = scaling.original_max_position_embeddings

    def correction_dim(num_rotations):
        return head_dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = inv_freq / scaling.factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv.float()


def query_scale(positions: torch.Tensor, beta: float, original_max: int) -> torch.Tensor:
    """Llama-4 attention temperature 1 + beta * ln(1 + floor(pos / original_max)) per position.

    ``positions`` are each half's own 0..L-1: the noisy and clean copies of a token get the same
    scale (the public Megatron code feeds 0..2L-1, wrong once 2L exceeds original_max).
    """
    return 1.0 + beta * torch.log1p(torch.floor(positions.double() / original_max)).float()
