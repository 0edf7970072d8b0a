"""Data throughput: nld-prepare-data tokens/s, and the training data loader against the trainer.

    python scripts/bench/data_throughput.py [--num-proc 1 2] [--steps 6] [--recipe demo_stage2] [--json out.json]

1. Preparation: the demo corpus (Shakespeare, cut into ~2,000-character documents) written as jsonl
   and prepared with `nld-prepare-data` (text) for each `--num-proc`, plus synthetic chat data (SFT,
   answer masks) built from the same lines. Timed end to end (dataset load from its cache,
   tokenisation, shard writing); tokens/s = tokens written / seconds.
2. Loader vs trainer: the real Trainer of `--recipe` (demo model, demo corpus). Loader tokens/s =
   data tokens of the steps' micro-batches fetched (`Trainer._micro_batches`: GPTDataset samples,
   collated, on the device) / seconds; trainer tokens/s = data tokens / median step time (the step
   includes its own data fetching). The ratio says how many times faster than training the loader
   is (> 1: the loader is not the bottleneck). The same for packed SFT rows (data.format=sft).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-proc", type=C.positive_int, nargs="+", default=[1, 2], help="tokenizer processes (1 2)")
    p.add_argument("--steps", type=C.positive_int, default=6, help="timed trainer steps (after 1 warm-up)")
    p.add_argument("--recipe", default="demo_stage2", help="trainer recipe for the loader ratio (demo_stage2)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def write_inputs(folder: Path) -> tuple[Path, Path]:
    from nld_train.data.demo_corpus import shakespeare_texts
    text_path, chat_path = folder / "text.jsonl", folder / "chat.jsonl"
    lines = []
    with open(text_path, "w") as f:
        for path in shakespeare_texts():
            doc = ""
            for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
                doc += para + "\n\n"
                lines.extend(x.strip() for x in para.splitlines() if x.strip())
                if len(doc) > 2000:
                    f.write(json.dumps({"text": doc}) + "\n")
                    doc = ""
            if doc:
                f.write(json.dumps({"text": doc}) + "\n")
    with open(chat_path, "w") as f:
        for i in range(0, len(lines) - 4, 4):
            msgs = [{"role": "user", "content": lines[i] + " " + lines[i + 1]},
                    {"role": "assistant", "content": lines[i + 2] + " " + lines[i + 3]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return text_path, chat_path


def bench_prepare(inp: Path, out: Path, num_proc: int) -> dict:
    from nld_train.data.prepare import load_source, prepare
    from nld_train.data.prepare import parse_args as prep_args
    from nld_train.data.tokenizer import DEMO_TOKENIZER
    args = [f"input={inp}", f"output={out}", f"tokenizer={DEMO_TOKENIZER}", f"num_proc={num_proc}", "overwrite=true"]
    load_source(prep_args(args))  # the datasets cache (arrow conversion of the jsonl) is built once, not timed
    t0 = time.perf_counter()
    m = prepare(prep_args(args))
    s = time.perf_counter() - t0
    return {"data": m["data"], "num_proc": num_proc, "documents": m["documents"], "tokens": m["tokens"],
            "seconds": s, "tokens_per_s": m["tokens"] / s, "documents_per_s": m["documents"] / s}


def bench_loader(recipe: str, run_dir: Path, steps: int, extra: list[str]) -> dict:
    import torch

    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    n_fetch = max(20, steps + 1)
    cfg = load_config([f"recipe={recipe}", f"run.dir={run_dir}", f"train.max_steps={n_fetch}",
                       "train.eval_interval=0", "checkpoint.save_final=false", "wandb.mode=disabled", *extra],
                      world_size=1)
    tr = Trainer(cfg)
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_length
    try:
        t0 = time.perf_counter()
        for step in range(n_fetch):
            for _ in tr._micro_batches(tr.train_ds, step):
                pass
        loader_s = time.perf_counter() - t0
        times = []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            tr.train_step(step)
            times.append(time.perf_counter() - t0)
        step_s = C.median(times[1:])
    finally:
        tr.close()
    loader_tps = n_fetch * tokens_per_step / loader_s
    trainer_tps = tokens_per_step / step_s
    return {"recipe": recipe, "data_format": cfg.data.format, "seq_length": t.seq_length,
            "global_batch_size": t.global_batch_size, "loader_tokens_per_s": loader_tps,
            "trainer_tokens_per_s": trainer_tps, "ratio": loader_tps / trainer_tps,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    results = {"environment": C.environment("cpu"), "prepare": [], "loader": []}
    with tempfile.TemporaryDirectory(prefix="nld-bench-data-") as tmp:
        tmp = Path(tmp)
        import os
        os.environ.setdefault("HF_HOME", str(tmp / "hf"))
        text, chat = write_inputs(tmp)
        for n in args.num_proc:
            results["prepare"].append(bench_prepare(text, tmp / f"text{n}", n))
            results["prepare"].append(bench_prepare(chat, tmp / f"chat{n}", n))
        results["loader"].append(bench_loader(args.recipe, tmp / "run", args.steps, []))
        chat_prefix = tmp / f"chat{args.num_proc[0]}"
        results["loader"].append(bench_loader(args.recipe, tmp / "run_sft", args.steps,
                                              [f"data.path={chat_prefix}", "data.format=sft", "data.split='95,5,0'"]))
    print("\npreparation (nld-prepare-data)")
    print(f"{'data':6} {'num_proc':>8} {'documents':>10} {'tokens':>11} {'seconds':>8} {'docs/s':>9} {'tokens/s':>10}")
    for r in results["prepare"]:
        print(f"{r['data']:6} {r['num_proc']:>8} {r['documents']:>10,} {r['tokens']:>11,} {r['seconds']:>8.1f} "
              f"{r['documents_per_s']:>9,.0f} {r['tokens_per_s']:>10,.0f}")
    print("\nloader vs trainer")
    print(f"{'recipe':14} {'format':6} {'L':>5} {'GBS':>4} {'loader tok/s':>13} {'trainer tok/s':>14} {'ratio':>8}")
    for r in results["loader"]:
        print(f"{r['recipe']:14} {r['data_format']:6} {r['seq_length']:>5} {r['global_batch_size']:>4} "
              f"{r['loader_tokens_per_s']:>13,.0f} {r['trainer_tokens_per_s']:>14,.0f} {r['ratio']:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
