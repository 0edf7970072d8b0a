"""Prompts -> a left-padded batch, and the table that compares every decoding mode on one set of
prompts (``nld-generate mode=all`` and the end of a training run): TPF, tokens per draft, NFE,
tokens/s, whether the text equals AR's and, when the prompts have checkable answers, accuracy."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from nld_train.decoding_modes import decode, get_mode, mode_names
from nld_train.inference.sol import sol_tpf


def encode_batch(tokenizer, prompts: Sequence[str], device="cpu", add_special_tokens: bool = False):
    """Left-padded ids and attention mask for a list of prompts."""
    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) or [tokenizer.eos_token_id]
               for p in prompts]
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


def timing_order(keys: Sequence[str], repeats: int) -> List[tuple]:
    """The timed decodes as (repeat, key), in run order: every repeat runs every mode, forwards on
    even repeats and backwards on odd ones, so that no mode is always the one measured first (or
    last) while the machine's speed drifts; each mode's tokens/s is the median over its repeats."""
    keys = list(keys)
    return [(r, k) for r in range(repeats) for k in (keys if r % 2 == 0 else keys[::-1])]


@torch.no_grad()
def continuation_nll(model, prompt_ids: Sequence[int], gen: Sequence[int]) -> float:
    """Σ -log p(token | everything before it) over ``gen``, read by the model as a causal LM after
    ``prompt_ids``: how likely the AR model finds a continuation, whichever mode wrote it."""
    if not gen:
        return 0.0
    ids = torch.tensor([list(prompt_ids) + list(gen)], device=model.device)
    cache = model.new_cache(1, ids.shape[1])
    logits = model.causal_pass(ids, cache).float()
    logp = torch.log_softmax(logits[0, len(prompt_ids) - 1: -1], dim=-1)
    target = ids[0, len(prompt_ids):]
    return float(-logp.gather(1, target[:, None]).sum())


@dataclass
class _Row:
    gen: List[List[int]] = field(default_factory=list)   # generated ids per prompt, in prompt order
    tokens: int = 0
    nfe_rows: int = 0        # Σ per-row NFE (TPF's denominator)
    nfe: int = 0             # forward passes of the batches
    accepted: List[int] = field(default_factory=list)
    rates: List[float] = field(default_factory=list)     # tokens/s of the timed repeats


def decode_table(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, block_length: int = 32,
                 thresholds: Sequence[float] = (0.9,), sol: bool = True,
                 check: Optional[Callable[[int, str], bool]] = None, batch_size: Optional[int] = None,
                 repeats: int = 3, add_special_tokens: bool = False, reverse: bool = False) -> str:
    """Decode ``prompts`` in every registered mode, a threshold-swept mode once per confidence
    threshold (greedy, left-padded batches of ``batch_size``, default all prompts in one); a table of
    TPF, tokens per draft, NFE, tokens/s and whether the text equals AR's (greedy self-speculation
    must always say yes; diffusion need not). ``check(i, text) -> bool`` scores prompt i's generated
    text and adds an accuracy column; without ``check`` (free text) the quality column is the
    model's own AR negative log-likelihood per generated token of each mode's text
    (:func:`continuation_nll`). ``reverse`` runs the modes in the reverse of the table's order (the
    rows are printed in the usual order), to check that no figure depends on which mode ran first.

    tokens/s is measured apart from the pass that gives the other columns, which is every mode's
    warm-up: ``repeats`` timed decodes of the first batch per mode, the modes alternating
    (:func:`timing_order`), the median reported. ``repeats=0`` prints no tokens/s."""
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    n = len(prompts)
    bs = batch_size or n
    batches = [encode_batch(tokenizer, prompts[i: i + bs], model.device, add_special_tokens) for i in range(0, n, bs)]
    runs = {(f"{m}@{thr:g}" if thr is not None else m): (m, thr)
            for m in mode_names() for thr in (thresholds if get_mode(m).sweep_thresholds else (None,))}

    def run(key, batch):
        mode, thr = runs[key]
        ids, mask = batch
        t0 = time.perf_counter()
        out, nfe = decode(model, mode, ids, max_new_tokens, block_length, thr if thr is not None else 0.9,
                          attention_mask=mask)
        seconds = time.perf_counter() - t0
        st = model.last_stats
        return _generated(out, ids.shape[1], st.new_tokens), nfe, st, seconds

    if reverse:
        runs = dict(reversed(list(runs.items())))
    rows = {k: _Row() for k in runs}
    for batch in batches:   # the measured pass (and every mode's warm-up for the timing below)
        for key, row in rows.items():
            gen, nfe, st, _ = run(key, batch)
            row.gen += gen
            row.tokens += sum(st.new_tokens)
            row.nfe_rows += sum(st.nfe_per_row)
            row.nfe += nfe
            row.accepted += [a for r in st.accepted for a in r]
    for _, key in timing_order(list(runs), repeats):
        gen, _, st, seconds = run(key, batches[0])
        rows[key].rates.append(sum(st.new_tokens) / max(seconds, 1e-9))

    sol_row = None
    if sol and max_new_tokens % block_length == 0:
        tok = nfe_rows = nfe = 0
        acc = []
        for ids, mask in batches:
            res = sol_tpf(model, ids, max_new_tokens, block_length, attention_mask=mask)
            st = model.last_stats
            tok, nfe_rows, nfe = tok + sum(st.new_tokens), nfe_rows + sum(st.nfe_per_row), nfe + res.nfe
            acc += [a for r in st.accepted for a in r]
        sol_row = (tok / max(nfe_rows, 1), sum(acc) / max(len(acc), 1), nfe)

    ar = rows["ar"].gen   # the reference every other mode is compared with
    prompt_ids = [ids[r][mask[r].bool()].tolist() for ids, mask in batches for r in range(ids.shape[0])]
    texts = {k: [tokenizer.decode(g, skip_special_tokens=True) for g in r.gen] for k, r in rows.items()}
    table = []
    for key, r in sorted(rows.items(), key=lambda kv: list(runs).index(kv[0]) * (-1 if reverse else 1)):
        same = sum(g == a for g, a in zip(r.gen, ar, strict=True))
        tpf = r.tokens / max(r.nfe_rows, 1)
        cells = [key, f"{tpf:.2f}"] + ([f"{tpf / sol_row[0]:.2f}"] if sol_row else []) + [
            f"{sum(r.accepted) / max(len(r.accepted), 1):.2f}", str(r.nfe),
            f"{statistics.median(r.rates):.1f}" if r.rates else "-", f"{same}/{n}"]
        if check is not None:
            correct = sum(bool(check(i, t)) for i, t in enumerate(texts[key]))
            cells.append(f"{correct}/{n} ({100 * correct / n:.0f} %)")
        else:
            nll = sum(continuation_nll(model, prompt_ids[i], g) for i, g in enumerate(r.gen))
            cells.append(f"{nll / max(r.tokens, 1):.3f}")
        table.append(tuple(cells))
    if sol_row:
        table.append(tuple(["SOL oracle", f"{sol_row[0]:.2f}", "1.00", f"{sol_row[1]:.2f}", str(sol_row[2]),
                            "-", "-", "-"]))
    head = (("mode", "TPF") + (("TPF/SOL",) if sol_row else ()) + ("tok/draft", "NFE", "tokens/s", "text == AR")
            + (("accuracy",) if check is not None else ("AR NLL/tok",)))
    widths = [max(len(r[i]) for r in table + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    swept = "".join(f"; {m}@t = confidence threshold t" for m in mode_names() if get_mode(m).sweep_thresholds)
    lines = [f"decoding {n} prompts, {max_new_tokens} new tokens, block {block_length} "
             f"(batches of {min(bs, n)}, greedy{swept})", fmt(head), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in table]
    lines.append("TPF = generated tokens / forward passes; tok/draft = tokens committed per draft/denoise "
                 "pass (AR: 1)" + ("; SOL = block diffusion with an oracle that commits every position whose "
                                   "argmax is already the AR token (the ceiling of any commit rule), TPF/SOL = "
                                   "the share of it a mode reaches" if sol_row else ""))
    if check is None:
        lines.append("AR NLL/tok = the model's own causal-LM negative log-likelihood per generated token of each "
                     "mode's text (free text has no answer to check; lower = text the AR model finds likelier, "
                     "greedy AR takes the likeliest token at every step)")
    if repeats:
        lines.append(f"tokens/s = median of {repeats} timed decodes of the first batch ({min(bs, n)} prompts) "
                     "per mode, after a warm-up decode of every mode, the modes in alternating order; on a CPU a "
                     "pass costs in proportion to the tokens it carries, so TPF, not tokens/s, is the figure "
                     "of merit there")
    return "\n".join(lines)
