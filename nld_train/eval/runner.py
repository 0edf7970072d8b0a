"""The evaluation loop: tasks x decoding modes, batched, resumable, with the counting of
docs/decoding.md (NFE and generated tokens per row from ``model.last_stats``).

Layout of ``out``::

    results.json  results.md  plots/<task>.png
    samples/<task>/<mode key>.jsonl       one line per sample: generation, verdict, counts
    samples/<task>/<mode key>.meta.json   the settings those lines were made with

Resuming: samples are cut into fixed batches (``batch_size`` consecutive samples in file order);
a batch whose lines are all on disk (and were made in the same batch) is not decoded again. A run
that was interrupted therefore continues where it stopped and gives the same numbers; a run with
other settings in the same ``out`` is refused (naming the settings) instead of mixing results.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

import torch

from nld_train.decoding_modes import decode, get_mode
from nld_train.errors import ConfigError
from nld_train.eval.report import write_reports
from nld_train.eval.sandbox import SandboxLimits, isolation, run_python
from nld_train.eval.settings import EvalSettings, mode_keys, validate_settings
from nld_train.eval.tasks import Sample, Task, check_shots, get_task
from nld_train.inference.sol import sol_tpf

# Arguments of the decode methods that the evaluator sets itself; they cannot be passed through.
RESERVED = {"input_ids", "max_new_tokens", "attention_mask", "block_length", "threshold", "temperature",
            "top_p", "generator"}
# name -> fn(value, model) -> the object the decode method expects, for pass-through arguments that
# are given as strings (e.g. a learned commit policy or a drafting adapter given by a folder).
DECODE_KWARG_CONVERTERS: Dict[str, Callable] = {}
FORMAT_VERSION = 1


@dataclass
class PromptIds:
    ids: List[int]
    shots: int
    too_long: bool


def resolve_format(fmt: str, tokenizer) -> str:
    if fmt == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "fewshot"
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt_format: chat, but the tokenizer has no chat template")
    return fmt


def build_prompt(task: Task, s: Sample, fmt: str, shots: int, tokenizer, budget: int) -> PromptIds:
    """The prompt with the most shots (up to ``shots``) whose tokens fit in ``budget``."""
    for k in range(shots, -1, -1):
        if fmt == "fewshot":
            ids = tokenizer.encode(task.fewshot_prompt(s, k).text, add_special_tokens=True)
        else:
            text = tokenizer.apply_chat_template(task.chat_messages(s, k), tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= budget:
            return PromptIds(ids, k, False)
    return PromptIds(ids, 0, True)


def _left_pad(seqs: List[List[int]], pad: int, device):
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


class SampleStore:
    """Per-sample jsonl of one task and mode; each batch is written with one write + fsync."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_path = path.with_name(path.name[: -len(".jsonl")] + ".meta.json")
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                what = "; ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
                raise ConfigError(f"{path} holds results made with other settings ({what}); use another out= "
                                  f"or move that folder away")
        else:
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, meta_path)
        self.records: Dict[int, dict] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        groups, kept_lines, dropped = [], [], 0
        for ln in lines:
            if not ln.strip():
                continue
            try:
                r = json.loads(ln)
            except json.JSONDecodeError:   # a line cut by a crash
                dropped += 1
                continue
            key = (r["batch"], r["batch_n"])
            if not groups or groups[-1][0] != key or len(groups[-1][1]) == key[1]:
                groups.append((key, []))
            groups[-1][1].append((r, ln))
        for key, members in groups:
            if len(members) == key[1]:
                for r, ln in members:
                    self.records[r["idx"]] = r
                    kept_lines.append(ln)
            else:
                dropped += len(members)
        if dropped:   # an interrupted batch: it is decoded again; keep the file consistent
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept_lines))
            os.replace(tmp, self.path)

    def has_batch(self, batch: int, idxs: List[int]) -> bool:
        rs = [self.records.get(i) for i in idxs]
        return all(r is not None and r["batch"] == batch and r["batch_n"] == len(idxs) for r in rs)

    def append_batch(self, records: List[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["idx"]] = r


def _mode_and_threshold(key: str) -> tuple:
    """A result key's decoding mode and threshold: a threshold-swept mode's key names its threshold
    (``diffusion@0.9``, decoding_modes.mode_keys); the others are given the default 0.9."""
    mode, _, thr = key.partition("@")
    return mode, float(thr) if thr else 0.9


def aggregate(records: List[dict]) -> dict:
    """accuracy over all n samples; NFE, tokens and TPF over the decoded ones (TPF = Σ tokens / Σ
    per-row NFE, docs/decoding.md); tokens/s = Σ tokens / Σ wall seconds of the batch decode calls."""
    n = len(records)
    gen = [r for r in records if not r.get("too_long")]
    tokens, nfe = sum(r["generated_tokens"] for r in gen), sum(r["nfe"] for r in gen)
    batches = {r["batch"]: (r["batch_seconds"], r["batch_nfe"]) for r in gen}
    secs = sum(b[0] for b in batches.values())
    correct = sum(bool(r["correct"]) for r in records)
    out = {"accuracy": correct / n if n else float("nan"), "n": n, "correct": correct, "nfe": nfe,
           "generated_tokens": tokens, "tpf": tokens / nfe if nfe else float("nan"),
           "tokens_per_s": tokens / secs if secs > 0 else float("nan"), "seconds": secs,
           "batch_nfe": sum(b[1] for b in batches.values()), "too_long": n - len(gen)}
    # tokens committed per draft pass (diffusion: per denoise pass; self-speculation: per cycle), as
    # the decode table's tok/draft; records stored by an older version lack the counts: no figure
    if gen and all("draft_passes" in r for r in gen):
        passes = sum(r["draft_passes"] for r in gen)
        out["tokens_per_draft"] = sum(r["draft_tokens"] for r in gen) / passes if passes else float("nan")
    return out


class Evaluator:
    def __init__(self, model, tokenizer, settings: EvalSettings, out, checkpoint: str = "", log=print):
        validate_settings(settings)
        self.model, self.tok, self.s, self.out = model, tokenizer, settings, Path(out)
        self.checkpoint, self.log = str(checkpoint), log
        self.B = settings.block_length or int(model.config.block_size)
        self.fmt = resolve_format(settings.prompt_format, tokenizer)
        self.ctx = int(model.config.max_position_embeddings)
        self.keys = mode_keys(settings)
        self.decode_kwargs = self._decode_kwargs()
        self.sandbox = None
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _decode_kwargs(self) -> Dict[str, dict]:
        out = {}
        for mode, kw in self.s.decode_kwargs.items():
            bad = RESERVED & set(kw)
            if bad:
                raise ConfigError(f"{mode}.{sorted(bad)[0]}: set by the evaluator (use its own key: thresholds=, "
                                  "block_length=, temperature=, ...)")
            out[mode] = {k: DECODE_KWARG_CONVERTERS[k](v, self.model) if k in DECODE_KWARG_CONVERTERS else v
                         for k, v in kw.items()}
        return out

    def _kwargs_for(self, mode: str) -> dict:
        return {**self.decode_kwargs.get("*", {}), **self.decode_kwargs.get(mode, {})}

    def _run_code(self):
        if self.sandbox is None:
            self.sandbox = isolation()
            if not (self.sandbox.get("network_isolated") and self.sandbox.get("own_uid")):
                self.log(f"warning: the code sandbox runs with reduced isolation on this machine: {self.sandbox}")
        lim = SandboxLimits(timeout_s=self.s.exec_timeout, cpu_s=max(1, math.ceil(self.s.exec_timeout)),
                            memory_mb=self.s.exec_memory_mb)
        return partial(run_python, limits=lim)

    # -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        self.out.mkdir(parents=True, exist_ok=True)
        results = {"checkpoint": self.checkpoint, "format_version": FORMAT_VERSION,
                   "settings": {**asdict(s), "block_length": self.B, "prompt_format": self.fmt},
                   "model": {"dtype": str(self.model.dtype).replace("torch.", ""), "device": str(self.model.device),
                             "context": self.ctx, "eos_token_id": self.model.config.eos_token_id},
                   "tasks": {}}
        for name in s.tasks:
            results["tasks"][name] = self.run_task(get_task(name))
        results["sandbox"] = self.sandbox
        write_reports(results, self.out, plots=s.plots)
        return results

    def run_task(self, task: Task) -> dict:
        s, B = self.s, self.B
        mnt = -(-(s.max_new_tokens or task.max_new_tokens) // B) * B
        budget = self.ctx - mnt - B
        if budget <= 0:
            raise ConfigError(f"max_new_tokens: {mnt} new tokens + block {B} leave no room for a prompt in the "
                              f"model's context of {self.ctx} tokens ({task.name})")
        shots = check_shots(task, s.shots.get(task.name))
        samples = task.samples()[: s.limit]
        prompts = [build_prompt(task, x, self.fmt, shots, self.tok, budget) for x in samples]
        run_code = self._run_code() if task.kind == "code" else None
        info = {"prompt_format": self.fmt, "shots": shots, "max_new_tokens": mnt, "block_length": B,
                "n": len(samples), "shots_reduced": sum(p.shots < shots for p in prompts),
                "too_long": sum(p.too_long for p in prompts), "modes": {}}
        if info["shots_reduced"]:
            self.log(f"{task.name}: {info['shots_reduced']}/{len(samples)} prompts use fewer than {shots} shots "
                     f"to fit the context ({self.ctx} tokens incl. {mnt} new + block {B})")
        if info["too_long"]:
            self.log(f"{task.name}: {info['too_long']} prompts do not fit even with 0 shots: scored as wrong, "
                     "not decoded")
        for key in self.keys:
            recs = self.run_mode(task, key, samples, prompts, mnt, run_code)
            info["modes"][key] = aggregate(recs)
        if s.sol:
            recs = self.run_mode(task, "sol", samples, prompts, mnt, None)
            tok = sum(r["generated_tokens"] for r in recs if not r.get("too_long"))
            nfe = sum(r["nfe"] for r in recs if not r.get("too_long"))
            info["sol_tpf"] = tok / nfe if nfe else float("nan")
            info["sol_forced"] = sum(r["forced"] for r in recs if not r.get("too_long") and r["row"] == 0)
        return info

    def _meta(self, task: Task, key: str, mnt: int) -> dict:
        s = self.s
        mode, _ = _mode_and_threshold(key)   # the arguments as given (converted objects have no stable repr)
        kw = {} if key == "sol" else {**s.decode_kwargs.get("*", {}), **s.decode_kwargs.get(mode, {})}
        return {"format_version": FORMAT_VERSION, "checkpoint": self.checkpoint, "task": task.name, "mode": key,
                "prompt_format": self.fmt, "shots": s.shots.get(task.name), "max_new_tokens": mnt,
                "block_length": self.B, "batch_size": s.batch_size,
                "spec_threshold": s.spec_threshold if key != "sol" and _drafts(mode) else None,
                "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                "dtype": str(self.model.dtype), "decode_kwargs": {k: repr(v) for k, v in sorted(kw.items())},
                "exec": [s.exec_timeout, s.exec_memory_mb] if task.kind == "code" else None}

    def run_mode(self, task: Task, key: str, samples, prompts, mnt: int, run_code) -> List[dict]:
        s = self.s
        store = SampleStore(self.out / "samples" / task.name / f"{key}.jsonl", self._meta(task, key, mnt))
        chunks = [list(range(i, min(i + s.batch_size, len(samples)))) for i in range(0, len(samples), s.batch_size)]
        done0 = sum(len(c) for bi, c in enumerate(chunks) if store.has_batch(bi, c))
        bar = None
        if s.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(samples), initial=done0, desc=f"{task.name} {key}", file=sys.stderr,
                       dynamic_ncols=True, leave=True)
        warm = key == "sol"
        for bi, idxs in enumerate(chunks):
            if store.has_batch(bi, idxs):
                continue
            if not warm:    # the mode's first decode pays one-off costs: keep them out of tokens/s
                self._warm_up(key, [i for i in idxs if not prompts[i].too_long], prompts)
                warm = True
            store.append_batch(self._decode_batch(task, key, bi, idxs, samples, prompts, mnt, run_code))
            if bar is not None:
                bar.update(len(idxs))
                done = [store.records[i] for c in chunks[: bi + 1] for i in c if i in store.records]
                if key == "sol":
                    a = aggregate([dict(r, correct=False) for r in done])
                    bar.set_postfix_str(f"SOL TPF {a['tpf']:.2f}")
                else:
                    a = aggregate(done)
                    bar.set_postfix_str(f"acc {a['accuracy']:.3f} TPF {a['tpf']:.2f}")
        if bar is not None:
            bar.close()
        return [store.records[i] for i in range(len(samples))]

    def _warm_up(self, key, gen_idxs, prompts) -> None:
        """One untimed decode of one block of the batch about to be timed, in the same mode."""
        if not gen_idxs:
            return
        ids, mask = _left_pad([prompts[i].ids for i in gen_idxs], self.pad, self.model.device)
        mode, thr = _mode_and_threshold(key)
        decode(self.model, mode, ids, self.B, self.B, threshold=thr, draft_threshold=self.s.spec_threshold,
               attention_mask=mask, **self._kwargs_for(mode))

    def _decode_batch(self, task, key, bi, idxs, samples, prompts, mnt, run_code) -> List[dict]:
        s, model = self.s, self.model
        base = {"mode": key, "batch": bi, "batch_n": len(idxs)}
        gen_idxs = [i for i in idxs if not prompts[i].too_long]
        records = {i: {**base, "idx": i, "id": samples[i].id, "too_long": True, "correct": False,
                       "shots": prompts[i].shots, "prompt_tokens": len(prompts[i].ids)}
                   for i in idxs if prompts[i].too_long}
        if gen_idxs:
            ids, mask = _left_pad([prompts[i].ids for i in gen_idxs], self.pad, model.device)
            P = ids.shape[1]
            forced = 0
            if key == "sol":
                res = sol_tpf(model, ids, mnt, self.B, attention_mask=mask)
                out, nfe, forced = None, res.nfe, res.forced
            else:
                mode, thr = _mode_and_threshold(key)
                kw = dict(self._kwargs_for(mode), temperature=s.temperature, top_p=s.top_p)
                if s.temperature > 0:   # per batch: the same numbers after a resume
                    kw["generator"] = torch.Generator(device=model.device).manual_seed(s.seed * 1_000_003 + bi)
                out, nfe = decode(model, mode, ids, mnt, self.B, threshold=thr, draft_threshold=s.spec_threshold,
                                  attention_mask=mask, **kw)
            st = model.last_stats
            for r, i in enumerate(gen_idxs):
                rec = {**base, "idx": i, "id": samples[i].id, "too_long": False, "shots": prompts[i].shots,
                       "prompt_tokens": len(prompts[i].ids), "generated_tokens": st.new_tokens[r],
                       "nfe": st.nfe_per_row[r], "batch_nfe": nfe, "batch_seconds": st.seconds, "row": r}
                if key == "sol":
                    rec.update(correct=False, forced=forced)
                else:
                    rec.update(draft_passes=len(st.accepted[r]), draft_tokens=sum(st.accepted[r]))
                    toks = out[r, P: P + st.new_tokens[r]].tolist()
                    text = self.tok.decode(toks, skip_special_tokens=True)
                    rec.update(generation=text, **task.check(samples[i], text, self.fmt, prompts[i], run_code))
                records[i] = rec
        return [records[i] for i in idxs]


def _drafts(mode: str) -> bool:
    """Whether the mode takes the draft threshold (``spec_threshold``), so its results depend on it."""
    return "draft_threshold" in get_mode(mode).kwargs.values()


def evaluate(model, tokenizer, settings: EvalSettings, out, checkpoint: str = "", log=print) -> dict:
    """Run ``settings`` on a loaded decoder; writes ``out`` (see the module docstring); returns the
    content of results.json."""
    return Evaluator(model, tokenizer, settings, out, checkpoint, log).run()
