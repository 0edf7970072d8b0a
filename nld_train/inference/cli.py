"""``nld-generate``: decode a prompt with a checkpoint in one of the decoding modes; and the demo table.

    nld-generate checkpoint=<run dir | step dir> mode={modes}|all
                 prompt="ROMEO:" max_new_tokens=64 block_length=32 threshold=0.9
                 [draft_threshold=0.0  (linear_spec: 0 fills the draft block in one pass, else the
                                        confidence rule until the block is filled)]
                 [thresholds=0.9,0.3   (mode=all: one diffusion row per confidence threshold)]
                 [temperature=0 top_p=1 seed=0 dtype=float32 device=cpu sol=false]
                 [repeats=3            (tokens/s: the median of this many timed decodes after one
                                        warm-up decode; mode=all: per mode, the modes alternating)]
                 [task=demo_math limit=100 batch_size=10
                                       (mode=all: decode the first `limit` prompts of an nld-eval
                                        task instead of `prompt`, with an accuracy column)]
                 [order=reversed       (mode=all: run the modes in the reverse of the table's order;
                                        tokens/s must not depend on it)]
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Sequence

import torch

from nld_train.decoding_modes import decode, get_mode, mode_names
from nld_train.inference import load_model, load_tokenizer
from nld_train.inference.sol import sol_tpf
from nld_train.inference.table import decode_table, encode_batch

DEFAULTS = dict(checkpoint=None, mode="ar", prompt="ROMEO:", max_new_tokens=64, block_length=32, threshold=0.9,
                draft_threshold=0.0, thresholds=(0.9,), temperature=0.0, top_p=1.0, seed=0, dtype="float32", device="cpu", sol=False,
                repeats=3, task="", limit=100, batch_size=10, order="registry")


def usage() -> str:
    """The docstring with the registered modes, and how each counts NFE."""
    modes = "".join(f"\n    {m:<16}NFE = {get_mode(m).nfe}" for m in mode_names())
    return __doc__.replace("{modes}", "|".join(mode_names())) + "modes:" + modes


def parse_args(argv: Sequence[str]) -> dict:
    args = dict(DEFAULTS)
    for a in argv:
        if "=" not in a:
            raise ValueError(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        k = k.lstrip("-").replace("-", "_")
        if k not in args:
            raise ValueError(f"unknown key {k!r} (known: {', '.join(DEFAULTS)})")
        d = DEFAULTS[k]
        if isinstance(d, bool):
            v = v.lower() in ("1", "true", "yes")
        elif isinstance(d, int):
            v = int(v)
        elif isinstance(d, float):
            v = float(v)
        elif isinstance(d, tuple):
            v = tuple(float(x) for x in v.strip("[]()").split(",") if x.strip())
        args[k] = v
    if args["repeats"] < 1:
        raise ValueError(f"repeats must be >= 1, got {args['repeats']}")
    if not args["checkpoint"]:
        raise ValueError("checkpoint=<run dir or step dir> is required")
    if args["order"] not in ("registry", "reversed"):
        raise ValueError(f"order must be 'registry' or 'reversed', got {args['order']!r}")
    if args["task"] and args["mode"] != "all":
        raise ValueError("task= needs mode=all (the table with an accuracy column)")
    if args["limit"] < 1 or args["batch_size"] < 1:
        raise ValueError("limit and batch_size must be >= 1")
    if args["mode"] not in mode_names() + ("all",):
        raise ValueError(f"mode={args['mode']!r} is not one of {', '.join(mode_names() + ('all',))}")
    return args


def main(argv: Sequence[str] | None = None, task_prompts=None) -> int:
    """``task_prompts(name, limit) -> (prompts, check)`` serves ``task=``: nld-eval's tasks sit above
    this layer, so the ``nld-generate`` entry point (:func:`nld_train.cli.generate_main`) passes it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        a = parse_args(argv)
    except ValueError as e:
        print(f"nld-generate: {e}", file=sys.stderr)
        return 2
    try:
        model = load_model(a["checkpoint"], device=a["device"], dtype=getattr(torch, a["dtype"]))
        tok = load_tokenizer(a["checkpoint"])
    except (ValueError, FileNotFoundError) as e:
        print(f"nld-generate: {e}", file=sys.stderr)
        return 2
    if a["mode"] == "all":
        prompts, check, specials = [a["prompt"]], None, False
        if a["task"]:
            if task_prompts is None:
                print("nld-generate: task= needs the nld-generate entry point (nld_train.cli:generate_main)",
                      file=sys.stderr)
                return 2
            try:
                prompts, check = task_prompts(a["task"], a["limit"])
            except Exception as e:      # an unknown task is a ConfigError naming the known ones
                print(f"nld-generate: task={a['task']}: {e}", file=sys.stderr)
                return 2
            specials = True             # encoded as nld-eval encodes them
        print(decode_table(model, tok, prompts, a["max_new_tokens"], a["block_length"], a["thresholds"],
                           sol=a["sol"], check=check, batch_size=a["batch_size"] if a["task"] else None,
                           repeats=a["repeats"], add_special_tokens=specials, reverse=a["order"] == "reversed"))
        return 0
    ids, mask = encode_batch(tok, [a["prompt"]], model.device)
    kw = dict(temperature=a["temperature"], top_p=a["top_p"])

    def run():
        if a["temperature"] > 0:   # every repeat draws the same tokens
            kw["generator"] = torch.Generator(device=model.device).manual_seed(a["seed"])
        t0 = time.perf_counter()
        out, nfe = decode(model, a["mode"], ids, a["max_new_tokens"], a["block_length"], a["threshold"],
                          attention_mask=mask, draft_threshold=a["draft_threshold"], **kw)
        return out, nfe, time.perf_counter() - t0

    try:
        out, nfe, _ = run()   # the warm-up: the first decode pays one-off costs (allocation, thread start)
    except ValueError as e:
        print(f"nld-generate: {e}", file=sys.stderr)
        return 2
    dt = statistics.median(run()[2] for _ in range(a["repeats"]))
    st = model.last_stats
    n = st.new_tokens[0]
    print(tok.decode(out[0, : ids.shape[1] + n].tolist()))
    print(f"--- mode={a['mode']} new_tokens={n} NFE={nfe} TPF={st.tpf:.2f} "
          f"tokens/draft={st.mean_accepted:.2f} tokens/s={n / max(dt, 1e-9):.1f} "
          f"(median of {a['repeats']} timed decodes after a warm-up)")
    if a["sol"]:
        res = sol_tpf(model, ids, a["max_new_tokens"], a["block_length"], attention_mask=mask)
        print(f"--- SOL oracle TPF={res.tpf:.2f} (forced commits {res.forced})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
