"""Offline benchmarks for every decoding mode: ``nld-eval`` (docs/evaluation.md).

``evaluate(model, tokenizer, EvalSettings(...), out)`` runs tasks x modes on a loaded decoder and
writes results.json, results.md, plots and per-sample jsonl. Importing this package is cheap
(``nld-train`` validates ``eval.*`` through :mod:`nld_train.eval.settings` before torch loads);
torch, the tasks' data and matplotlib are imported when used.
"""
from nld_train.eval.settings import TASK_NAMES, EvalSettings, mode_keys, validate_settings


def evaluate(*args, **kwargs):
    from nld_train.eval.runner import evaluate as _evaluate
    return _evaluate(*args, **kwargs)


__all__ = ["evaluate", "EvalSettings", "TASK_NAMES", "mode_keys", "validate_settings"]
