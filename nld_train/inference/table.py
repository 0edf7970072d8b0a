"""Prompts -> a left-padded batch, and the table that compares every decoding mode on one batch
(``nld-generate mode=all`` and the end of a training run)."""
from __future__ import annotations

from typing import Sequence

import torch

from nld_train.decoding_modes import decode, get_mode, mode_names
from nld_train.inference.sol import sol_tpf


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
    """Decode ``prompts`` (one left-padded batch) in every registered mode, a threshold-swept mode
    once per confidence threshold; a table of TPF, tokens/s and whether the text equals AR's (greedy
    self-speculation must always say yes; diffusion need not)."""
    ids, mask = encode_batch(tokenizer, prompts, model.device)
    P = ids.shape[1]
    rows, ar_tokens = [], None
    runs = [(m, thr) for m in mode_names() for thr in (thresholds if get_mode(m).sweep_thresholds else (None,))]
    for mode, thr in runs:
        out, nfe = decode(model, mode, ids, max_new_tokens, block_length, thr if thr is not None else 0.9,
                          attention_mask=mask)
        st = model.last_stats
        gen = _generated(out, P, st.new_tokens)
        if mode == "ar":   # the reference every other mode is compared with
            ar_tokens = gen
        same = sum(g == a for g, a in zip(gen, ar_tokens, strict=True))
        name = f"{mode}@{thr:g}" if thr is not None else mode
        rows.append((name, f"{st.tpf:.2f}", f"{st.mean_accepted:.2f}", str(nfe), f"{st.tokens_per_s:.1f}",
                     f"{same}/{len(prompts)}"))
    if sol and max_new_tokens % block_length == 0:
        res = sol_tpf(model, ids, max_new_tokens, block_length, attention_mask=mask)
        rows.append(("SOL oracle", f"{res.tpf:.2f}", f"{res.mean_accepted:.2f}", str(res.nfe), "-", "-"))
    head = ("mode", "TPF", "tok/draft", "NFE", "tokens/s", "text == AR")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    swept = "".join(f"; {m}@t = confidence threshold t" for m in mode_names() if get_mode(m).sweep_thresholds)
    lines = [f"decoding {len(prompts)} prompts, {max_new_tokens} new tokens, block {block_length} "
             f"(batch of {len(prompts)}, greedy{swept})", fmt(head),
             fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    lines.append("TPF = generated tokens / forward passes; tok/draft = tokens committed per draft/denoise "
                 "pass (AR: 1)")
    return "\n".join(lines)
