"""Training step time: AR step vs joint (AR + block diffusion) step, measured in the same run.

    python scripts/bench/train_step.py [--model tiny] [--seq-length 128 512] [key=value ...]

For each sequence length L, one trainer (the real ``nld_train.train.trainer.Trainer``: megatron
model, DDP, AdamW, the demo corpus) runs AR steps and joint steps alternately (the objective is
swapped between steps, so both kinds see the same weights, data pipeline and machine load).
Warm-up steps are excluded; the median of ``--repeats`` steps per kind is reported with data
tokens/s, achieved TFLOP/s and MFU, peak memory (CUDA), and the joint / AR step-time ratio.

FLOPs use ``nld_train.observability.train_flops_per_token`` (the trainer's progress line uses the
same formula): "AR-equiv" counts the work of an AR step over the same data tokens, "executed" the
model FLOPs of the step actually run (for joint: 2L tokens, attention over the keys the mask
allows). MFU needs a peak: the trainer's (``train.peak_tflops``, default: the bf16 peak of a known
GPU, none on CPU or an unknown GPU). Extra ``key=value`` arguments are nld-train overrides
(e.g. model.num_layers=16 train.peak_tflops=989).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default="tiny", help="model option of recipes/model (default: tiny)")
    p.add_argument("--seq-length", type=C.positive_int, nargs="+", default=[128, 512],
                   help="sequence lengths L to measure (default: 128 512)")
    p.add_argument("--micro-batch-size", type=C.positive_int, default=4, help="samples per micro-batch (4)")
    p.add_argument("--global-batch-size", type=C.positive_int, default=None,
                   help="samples per step (default: the micro-batch size, i.e. one micro-batch)")
    p.add_argument("--block-size", type=C.positive_int, default=32, help="diffusion block size (32)")
    p.add_argument("--backend", default="auto", choices=["auto", "sdpa", "flex"],
                   help="attention backend of the joint mask (model.attention_backend; default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per kind, not timed (2)")
    p.add_argument("--repeats", type=C.positive_int, default=5, help="timed steps per kind; median (5)")
    p.add_argument("--threads", type=C.positive_int, default=None, help="torch CPU threads (default: torch's)")
    return C.parse_trainer_bench_args(p, argv)


def bench_length(args, L: int, tmp: str) -> dict:
    import torch

    from nld_train.cli import load_config
    from nld_train.data import load_tokenizer
    from nld_train.model.attention import select_backend
    from nld_train.objective import objective_class
    from nld_train.observability import train_flops_per_token
    from nld_train.train.trainer import Trainer

    gb = args.global_batch_size or args.micro_batch_size
    n_steps = 2 * (args.warmup + args.repeats)
    base = ["recipe=smoke", f"model={args.model}", "objective=joint", f"run.dir={tmp}/L{L}", "wandb.mode=disabled"]
    cfg0 = load_config(base)
    # the bench trains on the demo corpus: use its tokenizer's mask id (overridable below)
    mask_id = load_tokenizer(cfg0.tokenizer.path).mask_token_id
    cfg = load_config(base + [f"model.mask_token_id={mask_id}", f"objective.block_size={args.block_size}",
                              f"train.seq_length={L}", f"train.micro_batch_size={args.micro_batch_size}",
                              f"train.global_batch_size={gb}", f"train.max_steps={n_steps}",
                              "train.eval_interval=0", f"model.attention_backend={args.backend}",
                              f"train.precision={args.precision}", "checkpoint.interval=0"] + args.overrides)
    tr = Trainer(cfg)
    try:
        objectives = {"joint": tr.objective, "ar": objective_class("ar").from_config(cfg)}
        device = tr.caps.device
        times = {k: [] for k in objectives}
        peak_mem = {k: 0 for k in objectives}
        step = 0
        for i in range(args.warmup + args.repeats):
            for kind in ("ar", "joint"):  # alternate: both kinds see the same load and weights
                tr.objective = objectives[kind]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                dt, _ = C.timed(functools.partial(tr.train_step, step), device)
                step += 1
                if i >= args.warmup:
                    times[kind].append(dt)
                    if device == "cuda":
                        peak_mem[kind] = max(peak_mem[kind], torch.cuda.max_memory_allocated())
        tokens = gb * L  # data tokens per step (the noisy copy is not counted)
        peak = tr.peak_flops  # train.peak_tflops or the detected one, exactly as the trainer's MFU
        world = tr.layout.world_size
        # exactly the trainer's MFU numerator (Trainer.flops_per_token), per kind
        f_ar = train_flops_per_token(cfg.model, L, objectives["ar"], tr.layout.tp)
        f_joint = train_flops_per_token(cfg.model, L, objectives["joint"], tr.layout.tp)
        rows = {}
        for kind in ("ar", "joint"):
            t = C.median(times[kind])
            tps = tokens / t
            useful, executed = f_ar * tps, (f_joint if kind == "joint" else f_ar) * tps
            rows[kind] = {"step_s": t, "step_s_all": times[kind], "tokens_per_s": tps,
                          "tflops_ar_equiv": useful / 1e12, "tflops_executed": executed / 1e12,
                          "mfu_ar_equiv": useful / (peak * world) if peak else None,
                          "mfu_executed": executed / (peak * world) if peak else None,
                          "peak_mem_gib": peak_mem[kind] / 2**30 if device == "cuda" else None}
        n_params = sum(p.numel() for p in tr.model.parameters())
        return {"seq_length": L, "micro_batch_size": args.micro_batch_size, "global_batch_size": gb,
                "block_size": args.block_size, "model": args.model, "overrides": args.overrides,
                "params": n_params, "precision": tr.precision, "te": tr.caps.transformer_engine,
                "backend": args.backend, "joint_backend": select_backend("joint") if args.backend == "auto"
                else args.backend, "world_size": world, "peak_tflops": peak / 1e12 if peak else None,
                "flops_per_token_ar": f_ar, "flops_per_token_joint": f_joint,
                "ar": rows["ar"], "joint": rows["joint"], "joint_over_ar": rows["joint"]["step_s"] / rows["ar"]["step_s"],
                # fastest steps: less sensitive to other load on a shared machine than the medians
                "joint_over_ar_min": min(times["joint"]) / min(times["ar"])}
    finally:
        tr.close()


def report(r: dict) -> str:
    head = ("kind", "step s (median)", "tokens/s", "TFLOP/s AR-equiv", "TFLOP/s executed", "MFU AR-equiv",
            "MFU executed", "peak mem GiB")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [(k, f"{r[k]['step_s']:.4f}", f"{r[k]['tokens_per_s']:.0f}", C.fmt(r[k]["tflops_ar_equiv"]),
             C.fmt(r[k]["tflops_executed"]), pct(r[k]["mfu_ar_equiv"]), pct(r[k]["mfu_executed"]),
             C.fmt(r[k]["peak_mem_gib"])) for k in ("ar", "joint")]
    title = (f"L={r['seq_length']} model={r['model']} ({r['params'] / 1e6:.1f}M params) micro_batch="
             f"{r['micro_batch_size']} global_batch={r['global_batch_size']} block={r['block_size']} "
             f"precision={r['precision']} te={r['te']} joint attention={r['joint_backend']}")
    return (f"{title}\n{C.table(head, rows)}\n"
            f"joint / AR step time: {r['joint_over_ar']:.2f} (medians), {r['joint_over_ar_min']:.2f} (fastest steps)  "
            f"(L={r['seq_length']}; target on GPU at L=4096: <= 2.1)")


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from nld_train.dist import capabilities, shutdown
    env = C.environment(capabilities().device)
    print(C.env_line(env), flush=True)
    import torch.distributed as dist
    owned = not dist.is_initialized()  # called in-process (tests) inside an existing group: keep it
    tmp = tempfile.mkdtemp(prefix="nld-bench-train-")
    results = []
    from nld_train.errors import InputError
    try:
        for L in args.seq_length:
            results.append(bench_length(args, L, tmp))
            print(report(results[-1]), flush=True)
    except InputError as e:  # a bad model option / override: one line, as nld-train prints it
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if owned:
            shutdown()
    if len(results) > 1:
        print("joint / AR (medians; fastest steps): " + ", ".join(
            f"L={r['seq_length']}: {r['joint_over_ar']:.2f}; {r['joint_over_ar_min']:.2f}" for r in results))
    C.write_json(args.json, {"bench": "train_step", "env": env, "argv": sys.argv[1:], "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
