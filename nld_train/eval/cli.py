"""``nld-eval``: benchmark a checkpoint in every decoding mode (accuracy, NFE, TPF, tokens/s).

    nld-eval checkpoint=<run dir | step dir> out=<dir>
             tasks=[gsm8k,math500,humaneval,mbpp] modes=[ar,diffusion,linear_spec,quadratic_spec]
             [limit=8 thresholds=[0.9,0.7] batch_size=8 max_new_tokens=256 block_length=32
              spec_threshold=0.0 prompt_format=auto|fewshot|chat shots.gsm8k=8 temperature=0 top_p=1
              seed=0 sol=true exec_timeout=20 exec_memory_mb=1024 dtype=float32 device=cpu
              progress=true plots=true decode.<arg>=<value> <mode>.<arg>=<value>]

Writes out/results.json, out/results.md, out/plots/<task>.png and out/samples/<task>/<mode>.jsonl;
running it again on the same out continues an interrupted run. See docs/evaluation.md.
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from typing import Sequence

from nld_train.decoding_modes import mode_names
from nld_train.errors import ConfigError, InputError
from nld_train.eval.report import markdown_table
from nld_train.eval.settings import EvalSettings, validate_settings

CLI_ONLY = dict(checkpoint=None, out=None, dtype="float32", device="cpu")


def _value(v: str):
    import yaml
    try:
        return yaml.safe_load(v) if v != "" else ""
    except yaml.YAMLError:
        return v


def parse_args(argv: Sequence[str]) -> tuple[dict, EvalSettings]:
    """key=value arguments -> (checkpoint/out/dtype/device, EvalSettings); ConfigError names the key."""
    cli, kw, shots, decode_kw = dict(CLI_ONLY), {}, {}, {}
    known = {f.name: f for f in fields(EvalSettings)}
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        k = k.lstrip("-").replace("-", "_")
        if k in CLI_ONLY:
            cli[k] = v
        elif k.startswith("shots."):
            shots[k[len("shots."):]] = _value(v)
        elif "." in k:
            head, arg = k.split(".", 1)
            if head != "decode" and head not in mode_names():
                raise ConfigError(f"unknown key {k!r}: dotted keys are shots.<task>, decode.<arg> or <mode>.<arg> "
                                  f"with a mode in {', '.join(mode_names())}")
            decode_kw.setdefault("*" if head == "decode" else head, {})[arg] = _value(v)
        elif k in known and k not in ("shots", "decode_kwargs"):
            val = _value(v)
            if k in ("tasks", "modes", "thresholds") and not isinstance(val, list):
                val = [val]
            kw[k] = val
        else:
            raise ConfigError(f"unknown key {k!r} (known: {', '.join(list(CLI_ONLY) + [n for n in known if n not in ('shots', 'decode_kwargs')])}, "
                              "shots.<task>, decode.<arg>, <mode>.<arg>)")
    for k, default in EvalSettings().__dict__.items():
        if k in kw and isinstance(default, bool) and not isinstance(kw[k], bool):
            raise ConfigError(f"{k}: expected true or false, got {kw[k]!r}")
        if k in kw and isinstance(default, (int, float)) and not isinstance(default, bool) \
                and not isinstance(kw[k], (int, float)):
            raise ConfigError(f"{k}: expected a number, got {kw[k]!r}")
    for k in ("limit", "max_new_tokens", "block_length"):
        if k in kw and kw[k] is not None and not isinstance(kw[k], int):
            raise ConfigError(f"{k}: expected an integer, got {kw[k]!r}")
    s = EvalSettings(**kw, shots=shots, decode_kwargs=decode_kw)
    validate_settings(s)
    for k in ("checkpoint", "out"):
        if not cli[k]:
            raise ConfigError(f"{k}=<{'run dir or step dir' if k == 'checkpoint' else 'output folder'}> is required")
    return cli, s


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        cli, settings = parse_args(argv)
        import torch

        # lazy (see pyproject.toml): torch loads only once the arguments are known to be good
        from nld_train.eval.runner import evaluate
        from nld_train.inference import load_model, load_tokenizer
        dtype = getattr(torch, cli["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype: {cli['dtype']!r} is not a torch dtype (float32, bfloat16, float64)")
        t0 = time.perf_counter()
        model = load_model(cli["checkpoint"], device=cli["device"], dtype=dtype)
        tok = load_tokenizer(cli["checkpoint"])
        res = evaluate(model, tok, settings, cli["out"], checkpoint=getattr(model, "checkpoint_path", cli["checkpoint"]),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except (InputError, FileNotFoundError) as e:
        print(f"nld-eval: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res), end="")
    print(f"wrote {cli['out']}/results.json, results.md, plots/ and samples/ in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
