"""The training hook: evaluate the trainer's in-memory weights every ``eval.interval`` steps."""
from __future__ import annotations

import torch

from nld_train.eval.runner import evaluate
from nld_train.eval.settings import from_eval_config
from nld_train.inference import from_megatron

LOGGED = ("accuracy", "tpf", "tokens_per_s")


def eval_during_training(trainer) -> dict:
    """Rank 0 only: the decoder is built from the trainer's TP=1 model (weights copied, RNG
    untouched), evaluated per ``cfg.eval`` into run.dir/eval/step_<8 digits>/; returns the metrics
    row entries ``eval/<task>/<mode>/<accuracy|tpf|tokens_per_s>`` (+ ``eval/<task>/sol_tpf``)."""
    cfg = trainer.cfg
    if trainer.layout.tp > 1:
        trainer.log("eval skipped at TP > 1: run nld-eval on the checkpoint instead")
        return {}
    out = trainer.run_dir / "eval" / f"step_{trainer.step:08d}"
    with torch.random.fork_rng(devices=[]):
        dec = from_megatron(trainer.model, cfg.model, eos_token_id=trainer.tokenizer.eos_token_id,
                            block_size=cfg.objective.block_size, device=trainer.device)
        res = evaluate(dec, trainer.tokenizer, from_eval_config(cfg.eval), out,
                       checkpoint=f"{trainer.run_dir} (in memory, step {trainer.step})", log=trainer.log)
    row = {}
    for task, info in res["tasks"].items():
        for mode, r in info["modes"].items():
            row.update({f"eval/{task}/{mode}/{k}": r[k] for k in LOGGED})
        if "sol_tpf" in info:
            row[f"eval/{task}/sol_tpf"] = info["sol_tpf"]
    trainer.log(f"eval at step {trainer.step}: " + ", ".join(
        f"{k[5:]}={v:.3f}" for k, v in row.items() if k.endswith(("/accuracy", "/tpf"))))
    return row
