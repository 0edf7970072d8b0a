"""Measure what the add-ons buy on held-out text (``python -m nld_train.addons.measure``).

    python -m nld_train.addons.measure checkpoint=runs/demo/stage2 \\
        samplers=ar:runs/demo/sampler,gt:runs/demo/sampler_gt loras=ce:runs/demo/lora_drafter \\
        n=32 prompt_length=32 max_new_tokens=64 block_length=32 thresholds=0.5,0.7,0.9,0.97 out=add_ons.json

Prompts are windows of the *held-out* documents of the checkpoint's training data (the last
``holdout_fraction`` of them; add-on data generation never reads those). The reference is the
model's greedy AR continuation (EOS ignored, so every row has ``max_new_tokens`` tokens):

- block diffusion, confidence threshold vs each learned sampler at each threshold: TPF (generated
  tokens / NFE incl. KV-write passes), tokens per denoise pass, token agreement with the AR
  reference (fraction of positions) and rows identical to it;
- the SOL oracle (the ceiling for a perfect sampler);
- linear self-speculation without / with each LoRA drafter: acceptance length (tokens per cycle),
  TPF, and whether the output equals AR (it must, always).

Prints a markdown table and writes the numbers as JSON to ``out``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nld_train.addons.text import token_windows
from nld_train.checkpoint import run_config
from nld_train.inference import load_model
from nld_train.inference.loading import resolve_checkpoint
from nld_train.inference.sampler import load_sampler
from nld_train.inference.sol import sol_tpf
from nld_train.lora import load_adapter

DEFAULTS = dict(checkpoint=None, samplers="", loras="", n=32, prompt_length=32, max_new_tokens=64, block_length=32,
                thresholds="0.5,0.7,0.9,0.97", holdout_fraction=0.1, seed=4321, batch_size=16, out="", threads=0)


def _named(spec: str):
    out = []
    for item in filter(None, spec.split(",")):
        name, _, path = item.partition(":")
        if not path:
            raise ValueError(f"expected name:path, got {item!r}")
        out.append((name, path))
    return out


def _decode(model, fn, ids, bs, **kw):
    outs, stats = [], dict(new=0, nfe=0, acc=[])
    for i in range(0, len(ids), bs):
        o, _ = fn(ids[i:i + bs], eos_token_id=-1, **kw)
        st = model.last_stats
        outs.append(o[:, ids.shape[1]:])
        stats["new"] += sum(st.new_tokens)
        stats["nfe"] += sum(st.nfe_per_row)
        stats["acc"] += [a for r in st.accepted for a in r]
    return torch.cat(outs), stats


def measure(model, prompts: torch.Tensor, samplers, loras, thresholds, max_new_tokens: int, block_length: int,
            batch_size: int = 16) -> dict:
    ref, _ = _decode(model, model.ar_generate, prompts, batch_size, max_new_tokens=max_new_tokens)
    res = {"n": len(prompts), "max_new_tokens": max_new_tokens, "block_length": block_length, "diffusion": [],
           "linear_spec": []}

    def row(kind, name, thr, out, st):
        return {"policy": kind, "name": name, "threshold": thr, "tpf": st["new"] / max(st["nfe"], 1),
                "tokens_per_pass": sum(st["acc"]) / max(len(st["acc"]), 1),
                "agreement": float((out == ref).float().mean()), "rows_equal": float((out == ref).all(1).float().mean())}

    policies = [("threshold", "confidence", None)] + [("sampler", n, load_sampler(p, model.device)) for n, p in samplers]
    for thr in thresholds:
        for kind, name, s in policies:
            out, st = _decode(model, model.generate, prompts, batch_size, max_new_tokens=max_new_tokens,
                              block_length=block_length, threshold=thr, sampler=s)
            res["diffusion"].append(row(kind, name, thr, out, st))
            print(f"  {res['diffusion'][-1]}", file=sys.stderr, flush=True)
    sol = sol_tpf(model, prompts, max_new_tokens, block_length, eos_token_id=-1)   # as the rows above
    res["sol"] = {"tpf": sol.tpf, "tokens_per_pass": sol.mean_accepted}
    for name, path in [("none", None)] + list(loras):
        ad = load_adapter(path, model.device) if path else None
        out, st = _decode(model, model.linear_spec_generate, prompts, batch_size, max_new_tokens=max_new_tokens,
                          block_length=block_length, lora=ad)
        res["linear_spec"].append({"lora": name, "acceptance": sum(st["acc"]) / max(len(st["acc"]), 1),
                                   "tpf": st["new"] / max(st["nfe"], 1), "equals_ar": bool(torch.equal(out, ref))})
        print(f"  {res['linear_spec'][-1]}", file=sys.stderr, flush=True)
    return res


def table(res: dict) -> str:
    lines = [f"held-out prompts: {res['n']}, {res['max_new_tokens']} new tokens, block {res['block_length']}, greedy",
             "", "| diffusion policy | threshold | TPF | tokens/denoise pass | agreement with AR | rows == AR |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["diffusion"]:
        who = "confidence" if r["policy"] == "threshold" else f"sampler ({r['name']})"
        lines.append(f"| {who} | {r['threshold']} | {r['tpf']:.2f} | {r['tokens_per_pass']:.2f} | "
                     f"{100 * r['agreement']:.1f}% | {100 * r['rows_equal']:.0f}% |")
    lines.append(f"| SOL oracle | - | {res['sol']['tpf']:.2f} | {res['sol']['tokens_per_pass']:.2f} | 100% | 100% |")
    lines += ["", "| linear self-spec | acceptance (tokens/cycle) | TPF | output == AR |", "| --- | --- | --- | --- |"]
    for r in res["linear_spec"]:
        lines.append(f"| LoRA {r['lora']} | {r['acceptance']:.2f} | {r['tpf']:.2f} | {r['equals_ar']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    a = dict(DEFAULTS)
    for item in argv:
        k, sep, v = item.partition("=")
        if not sep or k not in a:
            print(f"measure: unknown argument {item!r} (keys: {', '.join(DEFAULTS)})", file=sys.stderr)
            return 2
        a[k] = type(DEFAULTS[k])(v) if DEFAULTS[k] is not None else v
    if not a["checkpoint"]:
        print("measure: checkpoint=<run dir> is required", file=sys.stderr)
        return 2
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    step = resolve_checkpoint(a["checkpoint"])
    data_path = run_config(step)["data"]["path"]
    model = load_model(a["checkpoint"])
    prompts = token_windows(data_path, a["n"], a["prompt_length"], a["seed"], a["holdout_fraction"], holdout=True,
                            vocab_size=model.config.vocab_size)
    res = measure(model, prompts, _named(a["samplers"]), _named(a["loras"]),
                  [float(x) for x in a["thresholds"].split(",")], a["max_new_tokens"], a["block_length"], a["batch_size"])
    res["checkpoint"] = str(a["checkpoint"])
    print(table(res))
    if a["out"]:
        Path(a["out"]).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
