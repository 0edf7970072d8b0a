"""Learning-rate schedules as pure functions of the step (nothing to checkpoint but the length)."""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, schedule: str, warmup: int, total: int,
          decay_fraction: float = 0.2, decay_style: str = "linear") -> float:
    """LR for optimizer step ``step`` (0-based: the step about to be taken).

    ``total`` is the schedule length (stored at the first start); steps past it keep ``min_lr``
    (or ``lr`` for a constant schedule), so extending a run never rewrites the past.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":  # warmup, stable at lr, then decay over the last decay_fraction of total
        decay_steps = max(1, round(decay_fraction * total)) if decay_fraction > 0 else 0
        start = total - decay_steps
        if decay_steps == 0 or step < start:
            return lr
        progress = min(1.0, (step - start) / decay_steps)
        if decay_style == "linear":
            shape = 1 - progress
        elif decay_style == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif decay_style == "minus_sqrt":
            shape = 1 - math.sqrt(progress)
        elif decay_style == "exponential":  # megatron's WSD "exponential": 2 * 0.5^r - 1
            shape = 2 * 0.5 ** progress - 1
        else:
            raise ValueError(f"unknown decay style {decay_style!r}")
        return min_lr + (lr - min_lr) * shape
    raise ValueError(f"unknown lr schedule {schedule!r}")
