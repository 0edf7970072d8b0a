"""Sharded vs replicated AdamW state (parallel.distributed_optimizer), measured in the same run.

    torchrun --nproc_per_node=2 scripts/bench/optimizer.py [--model tiny] [--seq-length 256] [key=value ...]

Two real trainers (``nld_train.train.trainer.Trainer``: megatron model, DDP, the demo corpus), one
with the AdamW state replicated on every data-parallel rank and one with it sharded
(``parallel.distributed_optimizer=true``), take their steps alternately, so both see the same
data, weights and machine load. Reported per setting: the AdamW state bytes of the most loaded
rank, the median step time and the median ``optimizer.step`` time (the sharded one includes the
parameter broadcast), peak CUDA memory, and the sharded / replicated ratios. The weights after the
last step must be equal bit for bit; the script says so. Extra ``key=value`` arguments are
nld-train overrides (e.g. model.num_layers=16). One process works too (nothing is sharded then).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default="tiny", help="model option of recipes/model (default: tiny)")
    p.add_argument("--seq-length", type=C.positive_int, default=256, help="sequence length L (256)")
    p.add_argument("--micro-batch-size", type=C.positive_int, default=2, help="samples per micro-batch (2)")
    p.add_argument("--objective", default="joint", choices=["ar", "joint"], help="objective (joint)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per setting, not timed (2)")
    p.add_argument("--repeats", type=C.positive_int, default=5, help="timed steps per setting; median (5)")
    p.add_argument("--threads", type=C.positive_int, default=None, help="torch CPU threads (default: torch's)")
    return C.parse_trainer_bench_args(p, argv)


def state_bytes(optimizer) -> int:
    from nld_train.dist import local_optimizer
    return sum(v.numel() * v.element_size() for st in local_optimizer(optimizer).state.values()
               for v in st.values() if hasattr(v, "numel") and v.ndim > 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    import torch
    import torch.distributed as dist
    if args.threads:
        torch.set_num_threads(args.threads)
    from nld_train.cli import load_config
    from nld_train.data import load_tokenizer
    from nld_train.train.trainer import Trainer

    # one folder for all ranks (run dirs, megatron's data cache): named after the torchrun launch
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid())
    tmp = os.path.join(tempfile.gettempdir(), f"nld-bench-optimizer-{run_id}")
    n_steps = args.warmup + args.repeats
    base = ["recipe=smoke", f"model={args.model}", f"objective={args.objective}", "wandb.mode=disabled",
            f"train.seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch_size}",
            f"train.max_steps={n_steps}", "train.eval_interval=0", "checkpoint.interval=0"]
    mask_id = load_tokenizer(load_config(base).tokenizer.path).mask_token_id
    trainers, times, opt_times = {}, {}, {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, extra in (("replicated", []), ("sharded", ["parallel.distributed_optimizer=true"])):
        cfg = load_config(base + [f"model.mask_token_id={mask_id}", f"run.dir={tmp}/{name}",
                                  f"train.global_batch_size={args.micro_batch_size * world}", *extra,
                                  *args.overrides])
        tr = trainers[name] = Trainer(cfg)
        times[name], opt_times[name] = [], []
        real_step = tr.optimizer.step

        def timed_step(*a, _real=real_step, _out=opt_times[name], _dev=tr.caps.device, **k):
            dt, r = C.timed(lambda: _real(*a, **k), _dev)
            _out.append(dt)
            return r
        tr.optimizer.step = timed_step
    device = next(iter(trainers.values())).caps.device
    peak = {k: 0 for k in trainers}
    try:
        for step in range(n_steps):
            for name, tr in trainers.items():  # alternate: the same load for both settings
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                dt, _ = C.timed(functools.partial(tr.train_step, step), device)
                if step >= args.warmup:
                    times[name].append(dt)
                    if device == "cuda":
                        peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
        rows, res = [], {}
        for name, tr in trainers.items():
            mine = torch.tensor([float(state_bytes(tr.optimizer))], device=tr.device)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            res[name] = {"state_bytes_max_rank": int(mine.item()), "step_s": C.median(times[name]),
                         "optimizer_step_s": C.median(opt_times[name][args.warmup:]),
                         "peak_mem_gib": peak[name] / 2**30 if device == "cuda" else None}
        a, b = trainers["replicated"], trainers["sharded"]
        same = torch.tensor([float(all(torch.equal(x, y) for x, y in zip(a.params, b.params, strict=True)))], device=a.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        lay = a.layout
        if lay.rank == 0:
            for name in trainers:
                r = res[name]
                rows.append((name, f"{r['state_bytes_max_rank'] / 2**20:.1f}", f"{r['step_s']:.4f}",
                             f"{r['optimizer_step_s']:.4f}", C.fmt(r["peak_mem_gib"])))
            n_params = sum(p.numel() for p in a.model.parameters())
            print(C.env_line(C.environment(device)))
            print(f"model={args.model} ({n_params / 1e6:.1f}M params) L={args.seq_length} objective={args.objective} "
                  f"world={lay.world_size} (tp={lay.tp}, dp={lay.dp})")
            print(C.table(("AdamW state", "MiB on the most loaded rank", "step s (median)", "optimizer.step s",
                           "peak mem GiB"), rows))
            s, r = res["sharded"], res["replicated"]
            print(f"sharded / replicated: state {s['state_bytes_max_rank'] / r['state_bytes_max_rank']:.2f}, "
                  f"step time {s['step_s'] / r['step_s']:.2f}, optimizer.step {s['optimizer_step_s'] / r['optimizer_step_s']:.2f}; "
                  f"weights after {n_steps} steps equal bit for bit: {'yes' if same.item() == 1 else 'NO'}")
            if args.json:
                C.write_json(args.json, {"model": args.model, "seq_length": args.seq_length, "world": lay.world_size,
                                         "tp": lay.tp, "dp": lay.dp, "results": res, "bitwise_equal": same.item() == 1})
        return 0 if same.item() == 1 else 1
    finally:
        for tr in trainers.values():
            tr.close()
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
