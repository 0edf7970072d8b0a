"""Accuracy and TPF of a stage-2 run's checkpoints against the stage-2 tokens they were trained on.

    python scripts/demo_curve.py runs/demo_math/stage2 [--out runs/demo_math/curve] [--limit 100]

For every ``checkpoints/step_*`` of the run: ``nld-eval`` on the held-out ``demo_math`` problems in AR
and block diffusion at threshold 0.9 (greedy, block 32, 96 new tokens), the stage-2 tokens read up to
that step (the ``tokens`` column of metrics.jsonl), written to ``<out>/curve.json`` and plotted in
``<out>/curve.png``; each checkpoint's nld-eval output stays in ``<out>/step_<8 digits>`` (running the
script again reuses it). Prints a table and a least-squares line through the diffusion accuracies of
the last ``--fit`` checkpoints: the stage-2 tokens at which it reaches AR accuracy − 5 points.

The demo's stage 2 uses a WSD schedule (constant learning rate, then a linear decay over the last
40 % of the steps), so checkpoints before the decay are not annealed: they understate what a run of
that length would reach, and the line is a rough guide, not a law.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tokens_at(run: Path) -> dict:
    out = {}
    with open(run / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "step" in rec and "tokens" in rec:
                out[int(rec["step"])] = int(rec["tokens"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--fit", type=int, default=3, help="checkpoints (the last ones) the trend line is fitted to")
    args = ap.parse_args(argv)
    from nld_train.eval.cli import main as nld_eval

    run = args.run
    out = args.out or run.parent / "curve"
    steps = sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir())
    if not steps:
        print(f"demo_curve: no checkpoints in {run / 'checkpoints'}", file=sys.stderr)
        return 2
    tokens = tokens_at(run)
    points = []
    for ck in steps:
        step = int(ck.name.split("_")[1])
        ev = out / ck.name
        rc = nld_eval([f"checkpoint={ck}", f"out={ev}", "tasks=[demo_math]", "modes=[ar,diffusion]",
                       "thresholds=[0.9]", f"limit={args.limit}", "sol=false", "progress=false", "plots=false"])
        if rc:
            return rc
        modes = json.loads((ev / "results.json").read_text())["tasks"]["demo_math"]["modes"]
        points.append({"step": step, "tokens": tokens.get(step), "ar_accuracy": modes["ar"]["accuracy"],
                       "diffusion_accuracy": modes["diffusion@0.9"]["accuracy"],
                       "diffusion_tpf": modes["diffusion@0.9"]["tpf"]})
    fit = None
    pts = [p for p in points if p["tokens"] is not None][-args.fit:]
    if len(pts) >= 2:
        xs, ys = [p["tokens"] for p in pts], [p["diffusion_accuracy"] for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        target = points[-1]["ar_accuracy"] - 0.05
        reach = None if slope <= 0 else mx + (target - my) / slope
        fit = {"points": len(pts), "slope_per_million_tokens": slope * 1e6, "target_accuracy": target,
               "tokens_to_target": reach}
    (out / "curve.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"run": str(run), "limit": args.limit, "points": points,
                                                "fit": fit}, indent=1))
    print("| stage-2 step | stage-2 tokens | AR accuracy | diffusion@0.9 accuracy | diffusion@0.9 TPF |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for p in points:
        print(f"| {p['step']} | {p['tokens']:,} | {100 * p['ar_accuracy']:.0f} % | "
              f"{100 * p['diffusion_accuracy']:.0f} % | {p['diffusion_tpf']:.2f} |")
    if fit:
        reach = fit["tokens_to_target"]
        print(f"trend (last {fit['points']} checkpoints): {fit['slope_per_million_tokens'] * 100:+.1f} points per "
              f"million stage-2 tokens; AR - 5 points ({100 * fit['target_accuracy']:.0f} %) at "
              + (f"~{reach / 1e6:.1f}M stage-2 tokens" if reach else "no finite budget (flat or falling)"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("demo_curve: matplotlib missing, no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["tokens"] / 1e6 for p in points]
    ax.plot(x, [100 * p["ar_accuracy"] for p in points], "o-", label="AR accuracy")
    ax.plot(x, [100 * p["diffusion_accuracy"] for p in points], "s-", label="diffusion@0.9 accuracy")
    ax.set_xlabel("stage-2 tokens (millions)")
    ax.set_ylabel(f"accuracy on {args.limit} held-out problems (%)")
    ax2 = ax.twinx()
    ax2.plot(x, [p["diffusion_tpf"] for p in points], "^:", color="gray", label="diffusion@0.9 TPF")
    ax2.set_ylabel("TPF")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    ax.set_title("demo_math stage 2: accuracy and TPF per checkpoint")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
