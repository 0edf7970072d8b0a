"""The NLD report's training ablations at small scale, on the arithmetic demo (docs/ablations.md).

    python scripts/ablations.py --arm <name> --seed <s> [--out runs/ablations]   one arm, one seed
    python scripts/ablations.py --all [--seeds 0 1]                               every arm x seed
    python scripts/ablations.py --quick [--out runs/ablations_quick]              plumbing check (CI)
    python scripts/ablations.py --list                                            the arms

Every arm trains through ``nld-train`` (a subprocess per stage, recipes ``demo_math_stage1`` and
``demo_math_stage2`` plus the arm's overrides; ``--quick`` calls the same entry point in this one
process), then this process loads the final checkpoint and
measures it: accuracy on held-out problems in AR and diffusion@0.9 (``nld-eval``'s evaluator), TPF at
0.9, the SOL TPF and linear self-speculation's tokens per cycle, the AR loss and the diffusion loss at
fixed masking ratios on held-out problems. The arms read equal data tokens (the ``tokens`` column of
metrics.jsonl, checked); the two-stage arms split them 75/25 (600 AR +
200 joint steps: the report's 77/23) and share one stage-1 run per seed (the
stage-1 command does not depend on the arm: same data, same seed, same steps).

Writes ``<out>/results/<arm>_seed<s>.json`` per run, ``<out>/results/aggregate.json`` (mean and spread
over seeds of every arm found there, and the comparisons beside the report's deltas) and
``<out>/plots/{learning_curves,metrics}.png``. Re-running resumes: finished stages do no steps.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.25, 0.5, 0.75)        # fixed masking ratios of the validation diffusion loss
DECODE_BLOCK = 32                 # every arm is decoded (and its diffusion loss measured) at block 32
EVAL_SEED = 1234                  # noise seeds of the fixed-ratio loss: the same maskings for every arm


@dataclass(frozen=True)
class Arm:
    what: str
    stage2: tuple = ()            # nld-train overrides of the joint stage
    two_stage: bool = True        # False: joint from scratch over the tokens of both stages
    sft: bool = False             # joint stage on chat-formatted problems with answer-only loss masks


ARMS = {
    "baseline": Arm("two-stage (AR, then joint with the AR loss), combined normalisation, alpha 0.3, block 32"),
    "joint_scratch": Arm("joint from scratch: one joint stage over the tokens of both stages", two_stage=False),
    "ar_on": Arm("stage-2 AR loss on (ar_weight 1), separate normalisation",
                 ("objective.ar_weight=1.0", "objective.loss_normalization=separate")),
    "ar_off": Arm("stage-2 AR loss off (ar_weight 0), separate normalisation",
                  ("objective.ar_weight=0.0", "objective.loss_normalization=separate")),
    "sft_combined": Arm("stage 2 on answer-masked chat rows, global (combined) normalisation",
                        ("objective.loss_normalization=combined",), sft=True),
    "sft_per_microbatch": Arm("stage 2 on answer-masked chat rows, per-micro-batch normalisation",
                              ("objective.loss_normalization=per_microbatch",), sft=True),
    "alpha_0.1": Arm("alpha 0.1", ("objective.alpha=0.1",)),
    "alpha_1.0": Arm("alpha 1.0", ("objective.alpha=1.0",)),
    "block_16": Arm("training block 16 (decoded at 32)", ("objective.block_size=16",)),
    "block_64": Arm("training block 64 (decoded at 32)", ("objective.block_size=64",)),
}

# (comparison, arm with the report's choice, arm without it, the report's delta in average accuracy;
# shared/nld-spec.md "ablations (avg acc)", seeds 002)
COMPARISONS = (
    ("two-stage vs joint from scratch", "baseline", "joint_scratch", "+5.74"),
    ("AR loss kept in stage 2", "ar_on", "ar_off", "+7.48"),
    ("global vs per-micro-batch loss averaging", "sft_combined", "sft_per_microbatch", "+2.12"),
    ("alpha 0.3 vs 0.1", "baseline", "alpha_0.1", "0.3 best of 0.1-1.0"),
    ("alpha 0.3 vs 1.0", "baseline", "alpha_1.0", "0.3 best of 0.1-1.0"),
    ("training block 32 vs 16", "baseline", "block_16", "-"),
    ("training block 32 vs 64", "baseline", "block_64", "-"),
)

METRICS = ("ar_accuracy", "diffusion_accuracy", "val_loss_ar", *(f"val_loss_diff_t{t}" for t in RATIOS),
           "diffusion_tpf", "sol_tpf", "linear_spec_tpf", "linear_spec_tokens_per_cycle",
           "data_tokens", "train_flops", "train_seconds")


@dataclass
class Budget:
    """Steps of stage 1 (AR, shared by a seed's two-stage arms) and stage 2 (joint, per arm; the
    joint-from-scratch arm trains their sum), shapes, and the measurement sizes."""
    stage1_steps: int
    stage2_steps: int
    eval_limit: int
    val_rows: int
    shapes: tuple = ()            # extra nld-train overrides (quick mode: small rows)
    eval_interval: int = 0
    eval_iters: int = 2
    sft_problems: int = 40000
    in_process: bool = False      # train in this process (quick mode) instead of a subprocess per stage
    max_new_tokens: int | None = None  # None: the task's 96 (every answer fits)


# 600 + 200 steps: the report's split (stage 1 1T tokens, stage 2 300B: 77 / 23), sized so that the
# 20 runs fit the 120 minutes on 2 cores (docs/ablations.md, "Runtime")
FULL = Budget(stage1_steps=600, stage2_steps=200, eval_limit=100, val_rows=8, eval_interval=50)
# an untrained model never ends its answer: one block of new tokens instead of three
QUICK = Budget(stage1_steps=2, stage2_steps=2, eval_limit=2, val_rows=1, eval_interval=0, eval_iters=1,
               sft_problems=200, in_process=True, max_new_tokens=DECODE_BLOCK,
               shapes=("train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1"))


def log(msg: str) -> None:
    print(f"[ablations {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- training (nld-train subprocesses) ------------------------------------------------------------
def run_tool(module: str, args: list[str], in_process: bool) -> None:
    """``python -m <module> <args>`` (nld-train, nld-prepare-data): a subprocess per call, or (the
    quick mode) the same entry point called in this process, which saves the interpreter, torch and
    megatron start-up of every stage; the CLI supports that (a pipeline trains its stages in one
    process)."""
    log(f"{module} {' '.join(args)}")
    if in_process:
        import importlib
        rc = importlib.import_module(module).main(list(args))
    else:
        rc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO).returncode
    if rc:
        raise RuntimeError(f"{module} exited {rc}: {' '.join(args)}")


def nld_train(recipe: str, run_dir: Path, overrides: list[str], b: "Budget", steps: int) -> None:
    """Train a stage unless its final checkpoint is there already (nld-train would resume it and do
    no steps, but only after starting up: the shared stage 1 is asked for once per arm)."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}":
        log(f"{run_dir}: finished ({steps} steps), reused")
        return
    run_tool("nld_train.cli", [f"recipe={recipe}", f"run.dir={run_dir}", *common_overrides(b, steps), *overrides],
             b.in_process)


def common_overrides(b: Budget, steps: int) -> list[str]:
    return [f"train.max_steps={steps}", f"checkpoint.interval={steps}",
            "checkpoint.keep_last=1", f"train.eval_interval={b.eval_interval}", f"train.eval_iters={b.eval_iters}",
            f"train.log_interval={max(1, steps // 4)}", "train.decode_task=null", "wandb.mode=disabled", *b.shapes]


def prepare_sft(out: Path, b: Budget) -> str:
    """The demo's training problems as user/assistant turns (question / worked answer), through
    nld-prepare-data: the loss then covers answer tokens only, and rows packed at block boundaries
    hold different numbers of them, so loss-token counts vary across micro-batches."""
    from nld_train.data import demo_math

    folder = out / "sft_data"
    prefix = folder / f"demo_math_chat_{b.sft_problems}"
    if str(prefix) in _PREPARED:
        return str(prefix)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"problems_{b.sft_problems}.jsonl"
    with open(src, "w") as f:
        for p in demo_math.problems("train", b.sft_problems):
            f.write(json.dumps({"messages": [{"role": "user", "content": p.question},
                                             {"role": "assistant", "content": p.solution}]}) + "\n")
    # the demo's own layout ("Q: ...\n" then "A: ...\n"), in characters the demo tokenizer has; the
    # generation prompt is "A:", the prompt nld-eval gives the model, so the answer mask covers the
    # worked answer after it and the end of text
    template = folder / "chat_template.jinja"
    template.write_text("{%- for m in messages -%}{{- m['content'] -}}"
                        "{%- if m['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}{%- endfor -%}"
                        "{%- if add_generation_prompt -%}{{- 'A:' -}}{%- endif -%}")
    run_tool("nld_train.data.prepare", [f"input={src}", f"output={prefix}", f"tokenizer={demo_math.TOKENIZER_DIR}",
                                        f"chat_template={template}", "num_proc=1"], b.in_process)
    _PREPARED.add(str(prefix))   # nld-prepare-data would find it finished, but only after starting up
    return str(prefix)


_PREPARED: set = set()


def train_arm(out: Path, name: str, seed: int, b: Budget) -> list[Path]:
    """The arm's stage run dirs, in order (stage 1 first when there is one)."""
    arm, s1, s2 = ARMS[name], b.stage1_steps, b.stage2_steps
    base = out / f"seed_{seed}"
    if not arm.two_stage:
        joint = base / name / "joint"
        nld_train("demo_math_stage2", joint, [f"train.seed={seed}", *arm.stage2], b, s1 + s2)
        return [joint]
    stage1 = base / "stage1"
    nld_train("demo_math_stage1", stage1, [f"train.seed={seed}"], b, s1)
    data = ["data=sft", f"data.path={prepare_sft(out, b)}"] if arm.sft else []
    stage2 = base / name / "stage2"
    nld_train("demo_math_stage2", stage2, [f"train.seed={seed}", *data, *arm.stage2, f"checkpoint.init_from={stage1}"],
              b, s2)
    return [stage1, stage2]


# -- reading runs ---------------------------------------------------------------------------------
def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def run_config(run: Path) -> dict:
    import yaml
    return yaml.safe_load((run / "config.yaml").read_text())


def stage_flops(run: Path, tokens: int) -> float:
    """Training FLOPs of a stage: the trainer's own per-token count (Megatron-LM's accounting,
    nld_train.observability.train_flops_per_token) x its data tokens."""
    from nld_train.config import model_config_from_dict
    from nld_train.objective import build_objective
    from nld_train.observability import train_flops_per_token

    cfg = run_config(run)
    m, o = model_config_from_dict(cfg["model"]), cfg["objective"]
    obj = (build_objective("joint", mask_token_id=m.mask_token_id, block_size=o["block_size"])
           if o["name"] == "joint" else build_objective(o["name"]))
    return train_flops_per_token(m, cfg["train"]["seq_length"], obj) * tokens


# -- measurements of a trained arm --------------------------------------------------------------
def heldout_rows(seq_len: int, n_rows: int):
    """[n_rows, L + 1] ids of held-out problems laid out as the training corpus lays out documents
    (each problem's characters, then end of text), so the losses compare with training's."""
    import torch

    from nld_train.data import demo_math

    tok = demo_math.build_tokenizer()
    eod = tok.token_to_id("<|endoftext|>")
    need, ids, n = n_rows * (seq_len + 1), [eod], 0
    while len(ids) < need:
        n += 200
        ids = [eod]
        for p in demo_math.problems("heldout", n):
            ids += demo_math.encode_checked(tok, p.text) + [eod]
            if len(ids) >= need:
                break
    return torch.tensor(ids[:need]).view(n_rows, seq_len + 1)


def validation_losses(model, seq_len: int, n_rows: int) -> dict:
    """AR loss and the diffusion loss at fixed masking ratios (mean CE per masked token, without the
    1/t ELBO weight) on held-out problems, with the decoding model; joint layout at block 32."""
    import torch
    import torch.nn.functional as F

    from nld_train.objective import joint_attention_mask, noise_at_ratio, noise_seed

    rows = heldout_rows(seq_len, n_rows)
    tokens, labels = rows[:, :-1], rows[:, 1:]
    b, L = tokens.shape
    pos = torch.arange(L).repeat(b, 1)
    out = {}
    with torch.no_grad():
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(b, 1, L, L)
        logits = model(tokens, pos, attn_mask=causal).float()
        out["val_loss_ar"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
        joint = joint_attention_mask(L, DECODE_BLOCK)[None, None].expand(b, 1, 2 * L, 2 * L)
        seeds = [noise_seed(EVAL_SEED, i) for i in range(b)]
        maskable = torch.ones_like(tokens, dtype=torch.bool)
        for t in RATIOS:
            nt = noise_at_ratio(tokens, maskable, model.config.mask_token_id, seeds, t)
            logits = model(torch.cat([nt.noisy, tokens], 1), torch.cat([pos, pos], 1), attn_mask=joint)[:, :L].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
            out[f"val_loss_diff_t{t}"] = (ce[nt.masked.reshape(-1)].mean()).item()
    return out


def decode_metrics(model, tok, run: Path, out: Path, limit: int, max_new_tokens: int | None) -> dict:
    from nld_train.eval.runner import evaluate
    from nld_train.eval.settings import EvalSettings

    s = EvalSettings(tasks=["demo_math"], modes=["ar", "diffusion", "linear_spec"], thresholds=[0.9], limit=limit,
                     batch_size=10, block_length=DECODE_BLOCK, max_new_tokens=max_new_tokens, sol=True, progress=False,
                     plots=False)
    res = evaluate(model, tok, s, out, checkpoint=str(run), log=log)["tasks"]["demo_math"]
    m = res["modes"]
    return {"ar_accuracy": m["ar"]["accuracy"], "diffusion_accuracy": m["diffusion@0.9"]["accuracy"],
            "diffusion_tpf": m["diffusion@0.9"]["tpf"], "sol_tpf": res["sol_tpf"],
            "linear_spec_tpf": m["linear_spec"]["tpf"],
            "linear_spec_tokens_per_cycle": m["linear_spec"]["tokens_per_draft"],
            "linear_spec_equals_ar": _same_generations(out, "ar", "linear_spec"), "eval_n": m["ar"]["n"]}


def _same_generations(out: Path, a: str, b: str) -> bool:
    read = lambda k: [json.loads(ln)["generation"]   # noqa: E731
                      for ln in (out / "samples" / "demo_math" / f"{k}.jsonl").read_text().splitlines()]
    return read(a) == read(b)


def weight_distortion(cfg: dict, prefix: str, pad_id: int) -> dict:
    """How per-micro-batch averaging re-weights tokens in this SFT stage: for every global batch of
    the run (the trainer's rows, noise and micro-batches), a token of micro-batch k weighs
    1/(K n_k) instead of 1/N (n_k its micro-batch's AR + masked loss tokens, N = sum over the K
    micro-batches): the ratio N/(K n_k), whose token-weighted mean is exactly 1."""
    import torch

    from nld_train.data import get_samples
    from nld_train.data.indexed import resolve_data_path
    from nld_train.data.sft import SFTDataset
    from nld_train.objective import build_objective

    t, o = cfg["train"], cfg["objective"]
    prefixes, _ = resolve_data_path(prefix)
    ds = SFTDataset(prefixes, cfg["data"]["split"], 0, t["max_steps"] * t["global_batch_size"], t["seq_length"],
                    t["seed"], pad_id, o["block_size"], cfg["data"]["pack"])
    obj = build_objective("joint", mask_token_id=cfg["model"]["mask_token_id"], block_size=o["block_size"],
                          seed=t["seed"])
    ratios, weights, counts = [], [], []
    for step in range(t["max_steps"]):
        n = []
        for start in range(step * t["global_batch_size"], (step + 1) * t["global_batch_size"], t["micro_batch_size"]):
            idx = list(range(start, start + t["micro_batch_size"]))
            bt = get_samples(ds, idx)
            p = obj.prepare(bt["tokens"], bt["labels"], bt["loss_mask"], idx, bt["document_ids"], bt["position_ids"])
            n.append(float(p.n_ar + p.n_diff))
        total, k = sum(n), len(n)
        for nk in n:
            if nk:
                ratios.append(total / (k * nk))
                weights.append(nk)
        counts += n
    r, w = torch.tensor(ratios, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    mean = float((r * w).sum() / w.sum())
    std = float(((w * (r - mean) ** 2).sum() / w.sum()).sqrt())
    c = torch.tensor(counts, dtype=torch.float64)
    return {"token_weight_ratio_min": float(r.min()), "token_weight_ratio_max": float(r.max()),
            "token_weight_ratio_mean": mean, "token_weight_ratio_std": std,
            "loss_tokens_per_microbatch_mean": float(c.mean()),
            "loss_tokens_per_microbatch_cv": float(c.std() / c.mean()) if len(c) > 1 else 0.0,
            "microbatches": len(counts)}


def measure_arm(out: Path, name: str, seed: int, runs: list[Path], b: Budget) -> dict:
    from nld_train.inference import load_model, load_tokenizer

    final = runs[-1]
    tokens, flops, seconds, curves = 0, 0.0, 0.0, []
    for run in runs:
        rows = metrics_rows(run)
        last = max((r for r in rows if "tokens" in r), key=lambda r: r["step"])
        curves.append({"run": str(run), "objective": run_config(run)["objective"]["name"],
                       "tokens_before": tokens,
                       "rows": [{k: r.get(k) for k in ("step", "tokens", "loss", "loss_ar", "loss_diff",
                                                       "val_loss_ar", "val_loss_diff")} for r in rows]})
        flops += stage_flops(run, last["tokens"])
        seconds += sum(r.get("step_time_s", 0.0) for r in rows)
        tokens += last["tokens"]
    model = load_model(final)
    tok = load_tokenizer(final)
    seq_len = run_config(final)["train"]["seq_length"]
    res = {"arm": name, "seed": seed, "what": ARMS[name].what, "runs": [str(r) for r in runs],
           "data_tokens": tokens, "train_flops": flops, "train_seconds": seconds,
           "flops_counting": "nld_train.observability.train_flops_per_token (Megatron-LM's count) x data tokens, per stage",
           **validation_losses(model, seq_len, b.val_rows),
           **decode_metrics(model, tok, final, out / f"seed_{seed}" / name / "eval", b.eval_limit, b.max_new_tokens),
           "curves": curves}
    if ARMS[name].sft:
        res["weight_distortion"] = weight_distortion(run_config(final), prepare_sft(out, b), tok.pad_token_id)
    return res


def distortion_only(out: Path, b: Budget, seeds: list) -> int:
    """The SFT arms' token-weight distortion at the configured shapes, without training: the stage-2
    config composed as nld-train composes it, the rows, noise and micro-batches as its trainer
    builds them (seconds, not a run)."""
    import dataclasses

    from nld_train.cli import load_config
    from nld_train.inference import load_tokenizer

    prefix, res = prepare_sft(out, b), {}
    for seed in seeds:
        cfg = load_config(["recipe=demo_math_stage2", "data=sft", f"data.path={prefix}", f"train.seed={seed}",
                           *common_overrides(b, b.stage2_steps)])
        res[f"seed{seed}"] = weight_distortion(dataclasses.asdict(cfg), prefix,
                                               load_tokenizer(cfg.tokenizer.path).pad_token_id)
        log(f"seed {seed}: {res[f'seed{seed}']}")
    (out / "results" / "weight_distortion.json").write_text(json.dumps(res, indent=1))
    return 0


# -- aggregation and plots --------------------------------------------------------------------------
def spread(values: list) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": values}
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "values": values}


def aggregate(out: Path) -> dict:
    per = {}
    for f in sorted((out / "results").glob("*_seed*.json")):
        r = json.loads(f.read_text())
        per.setdefault(r["arm"], []).append(r)
    arms = {name: {"seeds": [r["seed"] for r in rs], "what": ARMS[name].what,
                   **{k: spread([r[k] for r in rs]) for k in METRICS}}
            for name, rs in per.items()}
    tokens = {name: a["data_tokens"]["values"] for name, a in arms.items()}
    flat = {t for v in tokens.values() for t in v}
    comps = []
    for what, a, b, report in COMPARISONS:
        if a in arms and b in arms:
            comps.append({"comparison": what, "with": a, "without": b, "report_delta_avg_accuracy": report,
                          **{k: compare(arms[a][k], arms[b][k], k) for k in COMPARED}})
    agg = {"arms": arms, "comparisons": comps, "equal_data_tokens": len(flat) <= 1, "data_tokens": sorted(flat),
           "verdict_rule": VERDICT_RULE}
    (out / "results" / "aggregate.json").write_text(json.dumps(agg, indent=1))
    (out / "results" / "tables.md").write_text(tables_markdown(agg))
    return agg


# the metrics each comparison reports; accuracies in points, losses in nats (lower is better)
COMPARED = ("diffusion_accuracy", "ar_accuracy", "val_loss_diff_t0.5", "val_loss_ar")
VERDICT_RULE = ("delta = mean(with) - mean(without); se = sqrt(sd_with^2/n_with + sd_without^2/n_without) over "
                "seeds; 'within noise' when |delta| <= 2 se, else 'agrees' when the arm with the report's choice "
                "is better (higher accuracy, lower loss), 'disagrees' when it is worse")


def compare(a: dict, b: dict, key: str) -> dict:
    """Difference of the seed means of two arms, its standard error and a verdict (VERDICT_RULE)."""
    if a["mean"] is None or b["mean"] is None:
        return {"delta": None, "se": None, "verdict": "not measured"}
    scale = 100.0 if key.endswith("accuracy") else 1.0
    delta = scale * (a["mean"] - b["mean"])
    if a["n"] < 2 or b["n"] < 2:
        return {"delta": delta, "se": None, "verdict": "one seed: no spread"}
    se = scale * math.sqrt(sum(s["std"] ** 2 / s["n"] for s in (a, b)))
    better = delta > 0 if key.endswith("accuracy") else delta < 0
    verdict = "within noise" if abs(delta) <= 2 * se else ("agrees" if better else "disagrees")
    return {"delta": delta, "se": se, "verdict": verdict}


def _ms(s: dict, scale: float, digits: int) -> str:
    if s["mean"] is None:
        return "-"
    sd = f" ± {scale * s['std']:.{digits}f}" if s["std"] is not None else ""
    return f"{scale * s['mean']:.{digits}f}{sd}"


def tables_markdown(agg: dict) -> str:
    """The per-arm table (mean ± sample standard deviation over seeds) and the comparisons, as
    docs/ablations.md shows them."""
    cols = (("ar_accuracy", "AR acc %", 100, 1), ("diffusion_accuracy", "diff@0.9 acc %", 100, 1),
            ("val_loss_ar", "val AR loss", 1, 3), *((f"val_loss_diff_t{t}", f"val diff loss t={t}", 1, 3)
                                                    for t in RATIOS),
            ("diffusion_tpf", "diff@0.9 TPF", 1, 2), ("sol_tpf", "SOL TPF", 1, 2),
            ("linear_spec_tokens_per_cycle", "linear tok/cycle", 1, 2), ("train_seconds", "train s", 1, 0))
    lines = ["| arm | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, a in agg["arms"].items():
        lines.append(f"| `{name}` | {len(a['seeds'])} | " + " | ".join(_ms(a[k], sc, d) for k, _, sc, d in cols) + " |")
    lines += ["", "| comparison | report's Δ (avg acc) | " + " | ".join(f"Δ {k}" for k in COMPARED) + " |",
              "|---|---|" + "---|" * len(COMPARED)]
    for c in agg["comparisons"]:
        cells = []
        for k in COMPARED:
            v = c[k]
            num = "-" if v["delta"] is None else f"{v['delta']:+.{1 if k.endswith('accuracy') else 3}f}"
            se = "" if v["se"] is None else f" (se {v['se']:.{1 if k.endswith('accuracy') else 3}f})"
            cells.append(f"{num}{se}: {v['verdict']}")
        lines.append(f"| {c['comparison']} (`{c['with']}` − `{c['without']}`) | {c['report_delta_avg_accuracy']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(out: Path, agg: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for f in sorted((out / "results").glob("*_seed*.json")):
        r = json.loads(f.read_text())
        for c in r["curves"]:
            xs = [(c["tokens_before"] + row["tokens"]) / 1e6 for row in c["rows"] if row.get("tokens")]
            for ax, key in zip(axes, ("loss_ar", "loss_diff"), strict=True):
                ys = [row.get(key) for row in c["rows"] if row.get("tokens")]
                if any(y is not None for y in ys) and not (key == "loss_ar" and c["objective"] == "ar"
                                                           and r["arm"] != "baseline"):
                    stage1 = c["objective"] == "ar"
                    color = "black" if stage1 else plt.cm.tab20(list(ARMS).index(r["arm"]) * 2 % 20 + r["seed"] % 2)
                    ax.plot(xs, ys, "--" if stage1 else "-", lw=0.8, color=color,
                            label=f"{'stage 1' if stage1 else r['arm']} s{r['seed']}")
    for ax, key in zip(axes, ("training AR loss", "training diffusion loss (ELBO-weighted)"), strict=True):
        ax.set_xlabel("data tokens (millions)")
        ax.set_title(key)
        ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "plots" / "learning_curves.png", dpi=100)
    plt.close(fig)

    names = list(agg["arms"])
    keys = ("ar_accuracy", "diffusion_accuracy", "diffusion_tpf", "linear_spec_tokens_per_cycle", "val_loss_ar",
            *(f"val_loss_diff_t{t}" for t in RATIOS))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, n in enumerate(names):
            s = agg["arms"][n][key]
            vals = [v for v in s["values"] if v is not None]
            if s["mean"] is not None:
                ax.bar(i, s["mean"], color="lightsteelblue")
                ax.plot([i] * len(vals), vals, "k.", ms=4)   # every seed: the spread as measured
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "plots" / "metrics.png", dpi=100)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", default=[], help="an arm (repeatable); --list names them")
    ap.add_argument("--seed", type=int, action="append", default=[], help="a seed (repeatable; default 0)")
    ap.add_argument("--all", action="store_true", help="every arm x --seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the seeds of --all (default 0 1)")
    ap.add_argument("--quick", action="store_true",
                    help="plumbing check in one process: every arm, one seed, 2 steps per stage, rows of 2 x 128 tokens, "
                         "2 eval problems")
    ap.add_argument("--stage1-steps", type=int, default=None,
                    help=f"AR steps of stage 1, shared by a seed's two-stage arms (default {FULL.stage1_steps})")
    ap.add_argument("--stage2-steps", type=int, default=None,
                    help=f"joint steps of each arm's stage 2 (default {FULL.stage2_steps}); the joint-from-scratch "
                         "arm trains stage-1 + stage-2 steps")
    ap.add_argument("--eval-limit", type=int, default=None, help=f"held-out problems decoded (default {FULL.eval_limit})")
    ap.add_argument("--out", type=Path, default=None, help="default runs/ablations (--quick: runs/ablations_quick)")
    ap.add_argument("--list", action="store_true", help="print the arms and exit")
    ap.add_argument("--distortion", action="store_true",
                    help="only measure the SFT arms' per-token weight distortion (per-micro-batch vs global "
                         "averaging) for --seeds at the --stage2-steps shape, without training")
    args = ap.parse_args(argv)
    if args.list:
        for n, a in ARMS.items():
            print(f"{n:20s} {a.what}")
        return 0
    for n in args.arm:
        if n not in ARMS:
            ap.error(f"unknown arm {n!r} (known: {', '.join(ARMS)})")
    if sum(bool(x) for x in (args.arm, args.all, args.quick, args.distortion)) != 1:
        ap.error("give exactly one of --arm, --all, --quick, --distortion")
    b = QUICK if args.quick else FULL
    for key in ("stage1_steps", "stage2_steps", "eval_limit"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                ap.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            b = replace(b, **{key: value})
    out = (args.out or REPO / ("runs/ablations_quick" if args.quick else "runs/ablations")).resolve()
    arms = list(ARMS) if (args.all or args.quick) else args.arm
    seeds = [0] if args.quick else (args.seeds if args.all else (args.seed or [0]))
    # this checkout's nld_train, here and in the subprocesses (run with cwd=REPO, so `-m` finds it)
    sys.path.insert(0, str(REPO))
    (out / "results").mkdir(parents=True, exist_ok=True)
    if args.distortion:
        return distortion_only(out, b, args.seeds)
    t0 = time.time()
    for seed in seeds:
        for name in arms:
            runs = train_arm(out, name, seed, b)
            res = measure_arm(out, name, seed, runs, b)
            (out / "results" / f"{name}_seed{seed}.json").write_text(json.dumps(res, indent=1))
            log(f"{name} seed {seed}: " + ", ".join(f"{k} {res[k]:.4g}" for k in METRICS))
    agg = aggregate(out)
    if not agg["equal_data_tokens"]:
        print(f"ablations: the arms read different numbers of data tokens: {agg['data_tokens']} "
              "(results from runs with other --stage1-steps / --stage2-steps in the same --out?)", file=sys.stderr)
        return 1
    plots(out, agg)
    log(f"wrote {out / 'results'} and {out / 'plots'} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
