"""LoRA drafter training: align the frozen LM's draft pathway with its own AR verifier (spec §3.6).

**Data.** Prompts (``lora.prompt_length`` tokens of the training documents) and the frozen LM's greedy
AR responses (``lora.response_length`` tokens, EOS ignored): self-generated text, stored as
``<run.dir>/lora_data/responses.parquet`` (column ``tokens``) + ``info.json``.

**Step.** Per response: one causal pass of the whole sequence with the adapter off (no gradient) gives
the verifier's next-token distributions and fills a KV cache; then ``lora.drafts_per_sequence``
draft blocks ``[x_s, MASK x (B-1)]`` at random offsets s of the response go through the model in
one forward with the adapter on — each block sees the cache before s and itself bidirectionally,
exactly the draft pass of ``linear_spec_generate`` (:func:`draft_mask`). Loss per draft position
s+j (j >= 1): ``ce`` = cross-entropy against the verifier's greedy token there (the spec's proposal),
``kl`` = KL(verifier || drafter) over the vocabulary (the mask id excluded from both). Reported:
``acc`` (draft argmax == verifier token) and ``accept`` (the acceptance length a block would get in
linear self-speculation: 1 + the correct prefix of its drafts).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from nld_train import atomic
from nld_train.addons.loop import fit, install_artifact
from nld_train.addons.text import token_windows
from nld_train.errors import DataError
from nld_train.inference import load_model
from nld_train.inference import masks as M
from nld_train.lora import ARTIFACT_DIR, LoRAAdapter


def draft_mask(starts: torch.Tensor, cache_len: int, block: int) -> torch.Tensor:
    """``[b, 1, K·B, L + K·B]``: draft block k of row r sees cache slots < ``starts[r, k]`` and its own
    block (bidirectionally), nothing of the other blocks."""
    b, K = starts.shape
    qb = torch.arange(K * block, device=starts.device) // block
    cache_ok = torch.arange(cache_len, device=starts.device)[None, None, :] < starts[:, qb][..., None]
    own = (qb[:, None] == qb[None, :]).expand(b, -1, -1)
    return torch.cat([cache_ok, own], -1)[:, None]


def draft_loss(model, adapter: LoRAAdapter, seqs: torch.Tensor, starts: torch.Tensor, block: int, loss: str = "ce"):
    """(loss summed over draft positions, {"acc": correct drafts, "accept": Σ acceptance lengths
    per position-count share}, number of draft positions). The adapter must be attached to ``model``."""
    b, L = seqs.shape
    K, B = starts.shape[1], block
    mask_id = model.config.mask_token_id
    dev = model.device
    with torch.no_grad():     # the verifier: plain model (adapter off), causal over the whole sequence
        adapter.gate = None
        cache = model.new_cache(b, L + K * B)
        v_logits = model(seqs, torch.arange(L, device=dev)[None].expand(b, -1),
                         M.causal_mask(cache.key_valid(), L), cache, update_cache=True)
        v_logits[..., mask_id] = float("-inf")
        j = torch.arange(1, B, device=dev)
        at = (starts[..., None] + j - 1)                                  # [b, K, B-1] verifier index
        v_sel = v_logits.gather(1, at.view(b, -1, 1).expand(-1, -1, v_logits.shape[-1])).view(b, K, B - 1, -1)
        target = v_sel.argmax(-1)
    drafts = torch.full((b, K, B), mask_id, dtype=torch.long, device=dev)
    drafts[:, :, 0] = seqs.gather(1, starts)
    pos = (starts[..., None] + torch.arange(B, device=dev)).view(b, K * B)
    adapter.gate = True
    d_logits = model(drafts.view(b, K * B), pos, draft_mask(starts, L, B), cache).view(b, K, B, -1)[:, :, 1:]
    adapter.gate = None
    d_logits = d_logits.masked_fill(torch.arange(d_logits.shape[-1], device=dev) == mask_id, float("-inf"))
    logp = torch.log_softmax(d_logits.float(), -1)
    if loss == "ce":
        total = -logp.gather(-1, target[..., None]).sum()
    elif loss == "kl":
        v_logp = torch.log_softmax(v_sel.float(), -1)
        total = (v_logp.exp() * (v_logp - logp).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum()
    else:
        raise ValueError(f"loss must be 'ce' or 'kl', got {loss!r}")
    correct = d_logits.argmax(-1) == target                               # [b, K, B-1]
    accept = correct.long().cumprod(-1).sum(-1) + 1                       # [b, K]
    n = correct.numel()
    return total, {"acc": float(correct.sum()), "accept": float(accept.sum()) * (B - 1)}, n


def _signature(cfg) -> dict:
    lo, a = cfg.lora, cfg.addon
    return {"base_model": str(Path(a.base_model).resolve()), "num_sequences": lo.num_sequences,
            "prompt_length": lo.prompt_length, "response_length": lo.response_length, "seed": cfg.train.seed,
            "holdout_fraction": a.holdout_fraction, "data_path": str(cfg.data.path)}


@torch.no_grad()
def generate_responses(cfg, model, data_dir, log=print) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lo, a = cfg.lora, cfg.addon
    out = Path(data_dir)
    tmp = atomic.begin(out)  # a leftover of an interrupted run is removed
    t0 = time.time()
    prompts = token_windows(cfg.data.path, lo.num_sequences, lo.prompt_length, cfg.train.seed + 17,
                            a.holdout_fraction, holdout=False, vocab_size=model.config.vocab_size)
    seqs = []
    for i in range(0, len(prompts), a.gen_batch_size):
        o, _ = model.ar_generate(prompts[i:i + a.gen_batch_size], lo.response_length, eos_token_id=-1)
        seqs.append(o.cpu())
    seqs = torch.cat(seqs).numpy()
    pq.write_table(pa.table({"tokens": pa.array(list(seqs), pa.list_(pa.int64()))}), tmp / "responses.parquet")
    (tmp / "info.json").write_text(json.dumps({"num_sequences": len(seqs), "length": seqs.shape[1],
                                               "config": _signature(cfg)}, indent=1))
    if out.exists():
        raise DataError(f"{out} appeared while generating LoRA data; not overwriting it")
    atomic.publish(tmp, out, replace=False)
    log(f"lora data: {len(seqs)} self-generated responses -> {out} ({time.time() - t0:.1f} s)")
    return out


def load_responses(data_dir, cfg) -> torch.Tensor:
    import pyarrow.parquet as pq
    d = Path(data_dir)
    if not (d / "info.json").is_file() or not (d / "responses.parquet").is_file():
        raise DataError(f"{d} is not a LoRA data folder (info.json + responses.parquet)")
    info = json.loads((d / "info.json").read_text())
    diff = [k for k, v in _signature(cfg).items() if info["config"].get(k) != v]
    if diff:
        raise DataError(f"LoRA data in {d} was generated with other settings ({', '.join(diff)}); delete it, "
                        "or set lora.data_dir to another folder")
    col = pq.read_table(d / "responses.parquet").column("tokens").combine_chunks()
    return torch.from_numpy(col.flatten().to_numpy().astype(np.int64)).view(info["num_sequences"], info["length"])


def train_lora(cfg, log=print) -> Path:
    """``nld-train recipe=lora_drafter``: responses (generated unless present), training,
    ``<run.dir>/linear_spec_lora/``."""
    lo, run_dir = cfg.lora, Path(cfg.run.dir)
    lm = load_model(cfg.addon.base_model)
    data_dir = Path(lo.data_dir) if lo.data_dir else run_dir / "lora_data"
    if not (data_dir / "info.json").is_file():
        log(f"generating LoRA data with {cfg.addon.base_model}")
        generate_responses(cfg, lm, data_dir, log)
    seqs = load_responses(data_dir, cfg)
    P, L, B, K = lo.prompt_length, seqs.shape[1], lo.block_length, lo.drafts_per_sequence
    if L - B < P:
        raise DataError(f"responses of {L - P} tokens cannot hold a draft block of {B}")
    adapter = LoRAAdapter.for_model(lm, lo.rank, lo.alpha, seed=cfg.train.seed)
    adapter.base_model = cfg.addon.base_model
    mb = cfg.train.micro_batch_size

    def micro_batches(indices):
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + hash(tuple(indices)) % (1 << 31))
        starts = torch.randint(P, L - B + 1, (len(indices), K), generator=g)
        idx = torch.tensor(indices)
        return [((idx[i:i + mb], starts[i:i + mb]), float(min(mb, len(indices) - i) * K * (B - 1)))
                for i in range(0, len(indices), mb)]

    def loss_sum(batch):
        idx, starts = batch
        total, extra, _ = draft_loss(lm, adapter, seqs[idx].to(lm.device), starts.to(lm.device), B, lo.loss)
        return total, extra

    with adapter.attached(lm):
        fit(cfg, adapter, len(seqs), micro_batches, loss_sum, log)
    out = adapter.save(run_dir / ARTIFACT_DIR)
    log(f"LoRA drafter saved to {out}")
    install_artifact(cfg, out, log)
    return out
