"""``nld-generate``: decode a prompt with a checkpoint in one of the four modes; and the demo table.

    nld-generate checkpoint=<run dir | step dir> mode=ar|diffusion|linear_spec|quadratic_spec|all
                 prompt="ROMEO:" max_new_tokens=64 block_length=32 threshold=0.9
                 [draft_threshold=0.0  (linear_spec: 0 fills the draft block in one pass, else the
                                        confidence rule until the block is filled)]
                 [thresholds=0.9,0.3   (mode=all: one diffusion row per confidence threshold)]
                 [temperature=0 top_p=1 seed=0 dtype=float32 device=cpu sol=false]
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

import torch

from nld_train.inference import load_model, load_tokenizer
from nld_train.inference.sol import sol_tpf

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
DEFAULTS = dict(checkpoint=None, mode="ar", prompt="ROMEO:", max_new_tokens=64, block_length=32, threshold=0.9,
                draft_threshold=0.0, thresholds=(0.9,), temperature=0.0, top_p=1.0, seed=0, dtype="float32", device="cpu", sol=False)


def decode(model, mode: str, input_ids, max_new_tokens: int, block_length: int = 32, threshold: float = 0.9,
           attention_mask=None, draft_threshold: float = 0.0, **kw):
    """One call of ``mode``; returns (out_ids, nfe) and leaves the stats in ``model.last_stats``.
    ``threshold``: diffusion's confidence threshold; ``draft_threshold``: linear self-speculation's
    (its own default 0: the whole draft block in one pass)."""
    if mode == "ar":
        return model.ar_generate(input_ids, max_new_tokens, attention_mask=attention_mask, **kw)
    if mode == "diffusion":
        return model.generate(input_ids, max_new_tokens, block_length=block_length, threshold=threshold,
                              attention_mask=attention_mask, **kw)
    if mode == "linear_spec":
        return model.linear_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                          threshold=draft_threshold, attention_mask=attention_mask, **kw)
    if mode == "quadratic_spec":
        return model.quadratic_spec_generate(input_ids, max_new_tokens, block_length=block_length,
                                             attention_mask=attention_mask, **kw)
    raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")


def encode_batch(tokenizer, prompts: Sequence[str], device="cpu"):
    """Left-padded ids and attention mask for a list of prompts."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) or [tokenizer.eos_token_id] for p in prompts]
    P = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, P - len(e):] = torch.tensor(e)
        mask[i, P - len(e):] = 1
    return ids.to(device), mask.to(device)


def _generated(out, P: int, n_new: Sequence[int]):
    return [out[i, P: P + n].tolist() for i, n in enumerate(n_new)]


def decode_table(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, block_length: int = 32,
                 thresholds: Sequence[float] = (0.9,), sol: bool = True) -> str:
    """Decode ``prompts`` (one left-padded batch) in all four modes, diffusion once per confidence
    threshold; a table of TPF, tokens/s and whether the text equals AR's (greedy self-speculation
    must always say yes; diffusion need not)."""
    ids, mask = encode_batch(tokenizer, prompts, model.device)
    P = ids.shape[1]
    rows, ar_tokens = [], None
    runs = [(m, thr) for m in MODES for thr in (thresholds if m == "diffusion" else (None,))]
    for mode, thr in runs:
        out, nfe = decode(model, mode, ids, max_new_tokens, block_length, thr if thr is not None else 0.9,
                          attention_mask=mask)
        st = model.last_stats
        gen = _generated(out, P, st.new_tokens)
        if mode == "ar":
            ar_tokens = gen
        same = sum(g == a for g, a in zip(gen, ar_tokens))
        name = f"{mode}@{thr:g}" if thr is not None else mode
        rows.append((name, f"{st.tpf:.2f}", f"{st.mean_accepted:.2f}", str(nfe), f"{st.tokens_per_s:.1f}",
                     f"{same}/{len(prompts)}"))
    if sol and max_new_tokens % block_length == 0:
        res = sol_tpf(model, ids, max_new_tokens, block_length, attention_mask=mask)
        rows.append(("SOL oracle", f"{res.tpf:.2f}", f"{res.mean_accepted:.2f}", str(res.nfe), "-", "-"))
    head = ("mode", "TPF", "tok/draft", "NFE", "tokens/s", "text == AR")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    lines = [f"decoding {len(prompts)} prompts, {max_new_tokens} new tokens, block {block_length} "
             f"(batch of {len(prompts)}, greedy; diffusion@t = confidence threshold t)", fmt(head),
             fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    lines.append("TPF = generated tokens / forward passes; tok/draft = tokens committed per draft/denoise "
                 "pass (AR: 1)")
    return "\n".join(lines)


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
    if not args["checkpoint"]:
        raise ValueError("checkpoint=<run dir or step dir> is required")
    if args["mode"] not in MODES + ("all",):
        raise ValueError(f"mode={args['mode']!r} is not one of {', '.join(MODES + ('all',))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
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
        print(decode_table(model, tok, [a["prompt"]], a["max_new_tokens"], a["block_length"], a["thresholds"],
                           sol=a["sol"]))
        return 0
    ids, mask = encode_batch(tok, [a["prompt"]], model.device)
    kw = dict(temperature=a["temperature"], top_p=a["top_p"])
    if a["temperature"] > 0:
        kw["generator"] = torch.Generator(device=model.device).manual_seed(a["seed"])
    t0 = time.perf_counter()
    try:
        out, nfe = decode(model, a["mode"], ids, a["max_new_tokens"], a["block_length"], a["threshold"],
                          attention_mask=mask, draft_threshold=a["draft_threshold"], **kw)
    except ValueError as e:
        print(f"nld-generate: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    st = model.last_stats
    n = st.new_tokens[0]
    print(tok.decode(out[0, : ids.shape[1] + n].tolist()))
    print(f"--- mode={a['mode']} new_tokens={n} NFE={nfe} TPF={st.tpf:.2f} "
          f"tokens/draft={st.mean_accepted:.2f} tokens/s={n / max(dt, 1e-9):.1f}")
    if a["sol"]:
        res = sol_tpf(model, ids, a["max_new_tokens"], a["block_length"], attention_mask=mask)
        print(f"--- SOL oracle TPF={res.tpf:.2f} (forced commits {res.forced})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
