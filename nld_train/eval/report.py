"""results.json, the markdown table and the accuracy-vs-TPF plots."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import List, Tuple

from nld_train.decoding_modes import get_mode, mode_names


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(results: dict) -> str:
    lines = ["| task | mode | accuracy | TPF | NFE | generated tokens | tokens/s | n |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for task, info in results["tasks"].items():
        for key, r in info["modes"].items():
            lines.append(f"| {task} | {key} | {_fmt(100 * r['accuracy'], '.1f')} % | {_fmt(r['tpf'])} | {r['nfe']} "
                         f"| {r['generated_tokens']} | {_fmt(r['tokens_per_s'], '.1f')} | {r['n']} |")
        if "sol_tpf" in info:
            lines.append(f"| {task} | SOL oracle | - | {_fmt(info['sol_tpf'])} | - | - | - | {info['n']} |")
        note = (f"{task}: {info['prompt_format']} prompts, {info['shots']} shots, max {info['max_new_tokens']} new "
                f"tokens, block {info['block_length']}")
        if info["shots_reduced"]:
            note += f"; {info['shots_reduced']} prompts with fewer shots (context)"
        if info["too_long"]:
            note += f"; {info['too_long']} prompts too long even with 0 shots (scored wrong)"
        notes.append(note)
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + [
        "- TPF = generated tokens / NFE (per-row forward passes, docs/decoding.md); tokens/s over the "
        "batched decode calls only"]) + "\n"


def pareto_front(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """(tpf, accuracy) points not dominated by another (higher or equal in both, one strictly)."""
    pts = [p for p in points if not any(math.isnan(v) for v in p)]
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]
    return sorted(set(front))


def plot_task(task: str, info: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = []
    for name in mode_names():   # a threshold-swept mode: one line through its thresholds
        if not get_mode(name).sweep_thresholds:
            continue
        sweep = sorted(((r["tpf"], 100 * r["accuracy"], k) for k, r in info["modes"].items()
                        if k.startswith(f"{name}@")))
        if sweep:
            ax.plot([d[0] for d in sweep], [d[1] for d in sweep], "-" + get_mode(name).marker[0],
                    color=get_mode(name).marker[1], label=f"{name} (thresholds)")
            for x, y, k in sweep:
                ax.annotate(k.split("@")[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for key, r in info["modes"].items():
        pts.append((r["tpf"], 100 * r["accuracy"]))
        if key in mode_names() and not get_mode(key).sweep_thresholds:
            m, c = get_mode(key).marker
            ax.plot([r["tpf"]], [100 * r["accuracy"]], m, color=c, label=key, markersize=8)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], ":", color="gray", label="Pareto front")
    if "sol_tpf" in info and not math.isnan(info["sol_tpf"]):
        ax.axvline(info["sol_tpf"], ls="--", color="tab:purple", label=f"SOL TPF {info['sol_tpf']:.2f}")
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{task}: accuracy vs TPF (n={info['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(x):
    """NaN (an empty task or mode) -> null: results.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_reports(results: dict, out: Path, plots: bool = True) -> None:
    out = Path(out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for task, info in results["tasks"].items():
            plot_task(task, info, out / "plots" / f"{task}.png")
