"""Checkpoint save/load time and size for a model option (default: micro and tiny), 1 process.

    python scripts/bench_checkpoint.py [model ...]
Prints one line per model: parameters, checkpoint size, first save (includes megatron's one-off
writer start-up), later saves, an async save's blocking time, and a load.
"""
import os
import sys
import tempfile
import time
from pathlib import Path


def bench(model: str) -> str:
    from nld_train import checkpoint as ckpt
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    d = tempfile.mkdtemp()
    tr = Trainer(load_config(["recipe=smoke", f"model={model}", f"run.dir={d}/r", "wandb.mode=disabled"]))
    tr.train_step(0)  # optimizer state exists, as in a real save
    saves = []
    for step in (1, 2, 3):
        t0 = time.time()
        ckpt.save(tr.run_dir, step, tr.model, tr.optimizer, {}, keep_last=5)
        saves.append(time.time() - t0)
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    queue = AsyncCallsQueue(persistent=False)
    t0 = time.time()
    ckpt.save(tr.run_dir, 4, tr.model, tr.optimizer, {}, keep_last=5, async_queue=queue)
    async_block = time.time() - t0
    queue.maybe_finalize_async_calls(blocking=True)
    async_total = time.time() - t0
    queue.close()
    latest = ckpt.find_latest(tr.run_dir)
    t0 = time.time()
    ckpt.load(latest, tr.model, tr.optimizer)
    load = time.time() - t0
    size = sum(f.stat().st_size for f in Path(latest).rglob("*") if f.is_file())
    n = sum(p.numel() for p in tr.model.parameters())
    tr.close()
    return (f"{model}: {n / 1e6:.2f}M params, checkpoint {size / 2**20:.1f} MiB, first save {saves[0]:.2f} s, "
            f"later saves {saves[1]:.2f}/{saves[2]:.2f} s, async save blocking {async_block:.2f} s "
            f"(done after {async_total:.2f} s), load {load:.2f} s")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    for m in sys.argv[1:] or ["micro", "tiny"]:
        print(bench(m), flush=True)
