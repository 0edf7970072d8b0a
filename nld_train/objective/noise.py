"""Forward (masking) process of the diffusion objective (spec §1.2, §1.7).

Noise is drawn per sample from a seed derived from (run seed, global sample index), on a CPU
generator. That makes it identical on tensor-parallel peers, different across samples and
data-parallel ranks, independent of how the global batch is split, identical on CPU and GPU, and
reproducible after a resume (no generator state to checkpoint).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_MASK63 = (1 << 63) - 1


def noise_seed(base_seed: int, sample_index: int) -> int:
    """Deterministic 63-bit seed for one sample.

    ``sample_index`` is the sample's GLOBAL index in the data stream (unique across steps and
    ranks). blake2b of a fixed text encoding is stable across processes and Python versions,
    unlike ``hash()`` (randomised per process), and mixes nearby indices thoroughly.
    """
    data = f"nld-noise:{int(base_seed)}:{int(sample_index)}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def maskable_positions(loss_mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """Token positions that may be masked, from a LABEL-aligned ``loss_mask`` [b, L] -> bool.

    ``loss_mask[:, i]`` says whether ``labels[:, i] = tokens[:, i+1]`` is a target, so token i is
    a target iff ``loss_mask[:, i-1]``: ``maskable[:, i] = loss_mask[:, i-1]`` for i >= 1. Nothing
    says whether token 0 is a target; it inherits ``loss_mask[:, 0]`` (its successor's label).
    Thus pretraining (all ones) masks every position, and a sequence that starts with a prompt
    never masks position 0. This fixes the public Megatron off-by-one (label mask applied to
    token positions).

    ``packed=True`` (packed SFT rows, which always begin with a document): token 0 is the first
    token of a document, the target of nothing, so it is never masked. Inside a row the data already
    zeroes ``loss_mask`` across document boundaries, so a document's first token is never masked
    either: only answer tokens ever are.
    """
    lm = loss_mask != 0
    first = torch.zeros_like(lm[:, :1]) if packed else lm[:, :1]
    return torch.cat([first, lm[:, :-1]], dim=1)


@dataclass
class NoisedTokens:
    noisy: torch.Tensor   # [b, L] long: x_t, mask id where masked
    masked: torch.Tensor  # [b, L] bool
    p: torch.Tensor       # [b] float32: masking probability of each row


def sample_noise(tokens: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, seeds,
                 eps: float = 1e-3) -> NoisedTokens:
    """Mask each row independently: t ~ U[0,1), p = (1-eps)*t + eps, masked = (u < p) & maskable.

    Row r depends only on ``seeds[r]`` (and L). ``mask_token_id`` must not occur in the data
    (not checked: it would cost a pass over the batch every step).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    t, u = _draw(tokens, maskable, seeds)
    p = (1.0 - eps) * t + eps  # eps > 0 keeps 1/p bounded in the loss
    return _mask(tokens, maskable, mask_token_id, p, u)


def noise_at_ratio(tokens: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, seeds,
                   ratio: float) -> NoisedTokens:
    """Mask each maskable position with the fixed probability ``ratio`` in every row: the forward
    process at one masking ratio t, to measure the diffusion loss as a function of t (validation;
    training draws t per row with :func:`sample_noise`).

    The per-position uniforms are those :func:`sample_noise` draws for the same seeds, so the
    positions masked at a smaller ratio are a subset of those masked at a larger one (the curves
    over t compare nested maskings, not independent draws).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    _, u = _draw(tokens, maskable, seeds)
    return _mask(tokens, maskable, mask_token_id, torch.full((tokens.shape[0],), float(ratio)), u)


def _draw(tokens: torch.Tensor, maskable: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [b], u [b, L]) from each row's seed: t first, then one uniform per position."""
    if tokens.dim() != 2 or maskable.shape != tokens.shape:
        raise ValueError(f"tokens and maskable must both be [b, L], got {tuple(tokens.shape)} "
                         f"and {tuple(maskable.shape)}")
    seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    b, L = tokens.shape
    if len(seeds) != b:
        raise ValueError(f"need one seed per row: {len(seeds)} seeds for {b} rows")

    # Draw on CPU: the CPU generator's stream is the same on every machine and device, so the
    # noise does not depend on where the model runs.
    t = torch.empty(b, dtype=torch.float32)
    u = torch.empty(b, L, dtype=torch.float32)
    for r, seed in enumerate(seeds):
        g = torch.Generator(device="cpu").manual_seed(seed)
        t[r] = torch.rand(1, generator=g)[0]
        u[r] = torch.rand(L, generator=g)
    return t, u


def _mask(tokens, maskable, mask_token_id: int, p: torch.Tensor, u: torch.Tensor) -> NoisedTokens:
    p_dev = p.to(tokens.device)
    masked = (u.to(tokens.device) < p_dev[:, None]) & maskable.to(device=tokens.device, dtype=torch.bool)
    noisy = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return NoisedTokens(noisy=noisy, masked=masked, p=p_dev)
