"""Checkpoint cost: how long a save blocks training, as a multiple of a training step.

    python scripts/bench/checkpoint.py [--model micro tiny]

Per model option (1 process, the smoke recipe's joint objective on the demo corpus): parameters,
checkpoint size, the median training step time, the blocking time of a synchronous save and of an
asynchronous save (megatron AsyncCallsQueue: the caller only waits for the state to be staged; the
write finishes in a background process), each divided by the step time, the time until the async
save is committed, and a load. The first save is reported apart: it includes megatron's one-off
writer start-up.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", nargs="+", default=["micro", "tiny"], help="model options (default: micro tiny)")
    p.add_argument("--seq-length", type=C.positive_int, default=64, help="train.seq_length of the steps (64)")
    p.add_argument("--steps", type=C.positive_int, default=3,
                   help="timed training steps before the saves (3); one more before every save")
    p.add_argument("--saves", type=C.positive_int, default=2, help="timed saves of each kind; median (2)")
    return C.parse_trainer_bench_args(p, argv)


def bench(model: str, args, tmp: str) -> dict:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from nld_train import checkpoint as ckpt
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    steps = 1 + args.steps + 2 * args.saves
    tr = Trainer(load_config(["recipe=smoke", f"model={model}", f"run.dir={tmp}/{model}", "wandb.mode=disabled",
                              f"train.seq_length={args.seq_length}", f"train.max_steps={steps}"]
                             + args.overrides))
    try:
        device = tr.caps.device
        tr.train_step(0)  # warm-up; the optimizer state exists, as in a real save
        it = iter(range(1, steps))

        def step():
            i = next(it)
            return C.timed(lambda: tr.train_step(i), device)[0]
        step_times = [step() for _ in range(args.steps)]
        keep = 2 * args.saves + 2
        n = 0

        def save(queue=None):
            nonlocal n
            n += 1
            return C.timed(lambda: ckpt.save(tr.run_dir, n, tr.model, tr.optimizer, {}, keep_last=keep,
                                             async_queue=queue), device)[0]
        first = save()
        queue = AsyncCallsQueue(persistent=False)  # as the trainer makes it
        sync_s, async_block, async_total = [], [], []
        try:  # saves alternate with steps, so both see the same load
            for _ in range(args.saves):
                step_times.append(step())
                sync_s.append(save())
                step_times.append(step())
                t0 = time.perf_counter()
                async_block.append(save(queue))
                queue.maybe_finalize_async_calls(blocking=True)
                async_total.append(time.perf_counter() - t0)
        finally:
            queue.close()
        step_s = C.median(step_times)
        latest = ckpt.find_latest(tr.run_dir)
        load_s = C.timed(lambda: ckpt.load(latest, tr.model, tr.optimizer), device)[0]
        size = sum(f.stat().st_size for f in Path(latest).rglob("*") if f.is_file())
        params = sum(p.numel() for p in tr.model.parameters())
    finally:
        tr.close()
    sync_m, ab_m = C.median(sync_s), C.median(async_block)
    return {"model": model, "params": params, "size_mib": size / 2**20, "step_s": step_s, "step_s_all": step_times,
            "first_save_s": first, "sync_save_s": sync_m, "sync_save_s_all": sync_s,
            "async_blocking_s": ab_m, "async_blocking_s_all": async_block,
            "async_committed_s": C.median(async_total), "load_s": load_s,
            "sync_over_step": sync_m / step_s, "async_blocking_over_step": ab_m / step_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    from nld_train.dist import capabilities, shutdown
    from nld_train.errors import InputError
    env = C.environment(capabilities().device)
    print(C.env_line(env), flush=True)
    import torch.distributed as dist
    owned = not dist.is_initialized()  # called in-process (tests) inside an existing group: keep it
    tmp = tempfile.mkdtemp(prefix="nld-bench-ckpt-")
    results = []
    try:
        for m in args.model:
            results.append(bench(m, args, tmp))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owned:
            shutdown()
    head = ("model", "params", "size MiB", "step s", "first save s", "sync save s", "sync / step",
            "async blocking s", "async blocking / step", "async committed s", "load s")
    print(C.table(head, [(r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['size_mib']:.1f}", f"{r['step_s']:.3f}",
                          f"{r['first_save_s']:.2f}", f"{r['sync_save_s']:.3f}", f"{r['sync_over_step']:.2f}",
                          f"{r['async_blocking_s']:.3f}", f"{r['async_blocking_over_step']:.2f}",
                          f"{r['async_committed_s']:.2f}", f"{r['load_s']:.2f}") for r in results]))
    C.write_json(args.json, {"bench": "checkpoint", "env": env, "argv": sys.argv[1:], "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
