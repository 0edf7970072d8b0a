"""Trained add-ons of a frozen NLD model: the learned sampler and the LoRA drafter (docs/addons.md).

``nld-train recipe=sampler`` / ``recipe=lora_drafter`` come here (``addon.kind``). Both are small
trainings over the plain decoding model (:mod:`nld_train.inference`) on one process: generate data
with the frozen LM, then fit a small module with :func:`nld_train.addons.loop.fit` (one loop for both,
built from the project's pieces: typed config, AdamW and LR schedule of ``nld_train.train``,
``MetricsLog``, the run-dir layout, atomic checkpoints and automatic resume).
"""
from __future__ import annotations

import sys

from nld_train.addons.lora import train_lora
from nld_train.addons.sampler import train_sampler
from nld_train.errors import InputError


def run_addon(cfg) -> int:
    """Train ``cfg.addon.kind``; bad input -> one line on stderr, exit 2."""
    try:
        if cfg.addon.kind == "sampler":
            train_sampler(cfg)
        elif cfg.addon.kind == "lora_drafter":
            train_lora(cfg)
        else:
            raise InputError(f"addon.kind={cfg.addon.kind!r} is not an add-on")
    except (InputError, FileNotFoundError) as e:
        print(f"nld-train: error: {e}", file=sys.stderr)
        return 2
    return 0
