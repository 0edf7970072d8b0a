"""The add-on training loop (sampler and LoRA drafter share it), built from the project's pieces.

A step: draw ``train.global_batch_size`` example indices (a generator seeded by ``train.seed`` and
the step, so a resumed run draws the same batches), let the task turn them into micro-batches of
``train.micro_batch_size`` with a *count* each (masked positions, draft tokens), backward every
micro-batch's loss sum divided by the count of the whole batch (exact global averaging, as in the LM
trainer), clip, AdamW (``nld_train.train.optim.build_optimizer``) with the LR of
``nld_train.train.schedule.lr_at``, log a ``metrics.jsonl`` line (``MetricsLog``), checkpoint.

Run dir: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_<8 digits>/`` (``addon.pt`` + the
commit marker ``nld_checkpoint.json``; written as ``tmp.step_N``, renamed, then ``latest`` replaced)
and the artifact folder (``sampler/`` or ``linear_spec_lora/``) written at the end. Starting again on
a run dir with a checkpoint resumes it; a changed config that alters the math is refused, as for the
LM (``run.allow_config_change``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Tuple

import torch

from nld_train import atomic
from nld_train.checkpoint import MARKER, step_dir_name
from nld_train.config import math_changes
from nld_train.errors import CheckpointError, ConfigError
from nld_train.inference.loading import resolve_checkpoint
from nld_train.observability import MetricsLog
from nld_train.train.optim import build_optimizer
from nld_train.train.schedule import lr_at

STATE = "addon.pt"


def latest_step_dir(run_dir) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        return None
    d = root / latest.read_text().strip()
    if not (d / MARKER).is_file() or not (d / STATE).is_file():
        raise CheckpointError(f"{latest} names {d}, which is not a complete add-on checkpoint")
    return d


def save_checkpoint(run_dir, step: int, state: dict, meta: dict, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    final = root / name
    with atomic.atomic_dir(final) as tmp:
        torch.save(state, tmp / STATE)
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps({**meta, "step": step}, indent=1))
            f.flush()
            os.fsync(f.fileno())
    (root / "latest.tmp").write_text(name + "\n")
    os.replace(root / "latest.tmp", root / "latest")
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and (p / MARKER).is_file())
    for old in steps[:-keep_last]:
        atomic.remove(root / old, ignore_errors=True)
    for p in root.iterdir():  # what an earlier kill during a delete left
        if p.name.startswith(atomic.TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    return final


def install_artifact(cfg, artifact: Path, log=print) -> Path | None:
    """Copy ``artifact`` (a folder) into the base model's run dir under the same name, replacing an
    older one atomically (``addon.install``); the HF export ships it from there."""
    if not cfg.addon.install:
        return None
    base_run = resolve_checkpoint(cfg.addon.base_model).parent.parent
    dst = base_run / artifact.name
    with atomic.atomic_dir(dst) as tmp:
        shutil.copytree(artifact, tmp, dirs_exist_ok=True)
    log(f"installed {artifact} next to the model: {dst}")
    return dst


def fit(cfg, module: torch.nn.Module, n_examples: int,
        micro_batches: Callable[[List[int]], List[Tuple[object, float]]],
        loss_sum: Callable[[object], Tuple[torch.Tensor, dict]], log: Callable[[str], None] = print) -> None:
    """Train ``module`` (its ``requires_grad`` parameters) for ``train.max_steps`` steps.

    ``micro_batches(indices)`` -> [(micro_batch, count)]; ``loss_sum(micro_batch)`` -> (sum of the
    per-item losses, {metric: sum}) — metrics are reported divided by the batch's total count.
    """
    t, run_dir = cfg.train, Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(module, t)
    # the schedule's length is fixed at the first start (stored in the checkpoint), as for the LM:
    # raising train.max_steps later extends training without rewriting past LRs
    step, total = 0, t.lr_schedule_steps or t.max_steps
    latest = latest_step_dir(run_dir)
    if latest is not None:
        meta = json.loads((latest / MARKER).read_text())
        changed = math_changes(meta.get("config", {}), asdict(cfg))
        if changed and not cfg.run.allow_config_change:
            raise ConfigError(f"run dir {run_dir} holds add-on checkpoint {latest} trained with another config "
                              f"({', '.join(changed)}); use another run.dir or run.allow_config_change=true")
        state = torch.load(latest / STATE, weights_only=False)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        total = t.lr_schedule_steps or state["lr_schedule_steps"]
        log(f"resumed from {latest} at step {step}")
    metrics = MetricsLog(run_dir, step)
    log(f"training {cfg.recipe or cfg.addon.kind}: {sum(p.numel() for p in params):,} trainable parameters, "
        f"{n_examples} examples, steps {step}->{t.max_steps}, run_dir={run_dir}")
    module.train()
    try:
        while step < t.max_steps:
            t0 = time.time()
            g = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
            idx = torch.randint(0, n_examples, (t.global_batch_size,), generator=g).tolist()
            mbs = micro_batches(idx)
            count = sum(c for _, c in mbs)
            opt.zero_grad(set_to_none=True)
            loss_total, extra = 0.0, {}
            for mb, _ in mbs:
                s, ex = loss_sum(mb)
                (s / count).backward()
                loss_total += float(s.detach())
                for k, v in ex.items():
                    extra[k] = extra.get(k, 0.0) + float(v)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else math.inf))
            lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, schedule=t.lr_schedule, warmup=t.lr_warmup_steps,
                       total=total, decay_fraction=t.lr_decay_fraction, decay_style=t.lr_decay_style)
            for group in opt.param_groups:
                group["lr"] = lr
            if math.isfinite(grad_norm):
                opt.step()
            step += 1
            dt = time.time() - t0
            row = {"step": step, "loss": loss_total / count, "lr": lr, "grad_norm": grad_norm,
                   "items": count, "items_per_s": count / dt, "step_time_s": dt,
                   **{k: v / count for k, v in extra.items()}}
            metrics.write(row)
            if step % t.log_interval == 0 or step == t.max_steps:
                log(" | ".join([f"step {step}/{t.max_steps}", f"loss {row['loss']:.4f}",
                                *(f"{k} {v / count:.4f}" for k, v in extra.items()),
                                f"lr {lr:.2e}", f"grad_norm {grad_norm:.3f}"]))
            if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or \
                    (step == t.max_steps and cfg.checkpoint.save_final):
                save_checkpoint(run_dir, step, {"module": module.state_dict(), "optimizer": opt.state_dict(),
                                                "step": step, "lr_schedule_steps": total}, {"config": asdict(cfg), "recipe": cfg.recipe},
                                cfg.checkpoint.keep_last)
    finally:
        metrics.close()
    module.eval()
