"""Learned sampler: data generation (denoising traces of the frozen LM) and training.

**Data.** Windows of ``prompt_length + num_blocks * block_length`` tokens from the training documents.
The reference continuation is the LM's own greedy AR decode of the prompt (``sampler.label=ar``, the
spec's reading) or the window's text (``ground_truth``). Each block is denoised exactly as
``generate`` does (AR seed, bidirectional passes over the cache, the threshold rule with a
behaviour threshold drawn per block from ``sampler.behaviour_thresholds`` so the traces cover
cautious and greedy states), and every pass is one example: the features of all B positions
(:func:`nld_train.inference.sampler.block_features`), which positions are masked, and the label
"top-1 == reference token" per position. The context of the next block is the reference block
(teacher forcing: the KV-write pass writes the reference), so every example's context is the
reference's, whatever was committed before.

Written as parquet shards (``datasets.load_dataset("parquet", data_dir=...)`` reads them):
``train-XXXXX.parquet`` with columns ``window`` (int), ``block``, ``step``, ``features`` (B·F
float32, row-major [B, F]), ``ids`` (B·4 int64), ``masked`` (B bool), ``label`` (B bool); plus
``info.json`` (shapes, feature names, the generating config) and ``token_table.safetensors``.

**Training.** Binary cross-entropy on the masked positions, averaged over all masked positions of
the global batch; the last 10 % of the windows are the validation set (loss, accuracy and the
precision of the positions scored >= 0.9 are reported at the end and stored in ``sampler/config.json``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nld_train import atomic
from nld_train.addons.loop import fit, install_artifact
from nld_train.addons.text import token_windows
from nld_train.errors import DataError
from nld_train.inference import load_model
from nld_train.inference.policies import top1_mask
from nld_train.inference.sampler import (
    ARTIFACT_DIR,
    FEATURE_NAMES,
    NUM_FEATURES,
    TOKEN_SLOTS,
    SamplerModel,
    SamplerModelConfig,
    block_features,
    save_sampler,
    token_table_from_embeddings,
)

DATA_KEYS = ("base_model", "label", "num_sequences", "prompt_length", "num_blocks", "block_length",
             "behaviour_thresholds", "token_dim", "seed", "holdout_fraction", "data_path")


@torch.no_grad()
def record_denoising(model, windows: torch.Tensor, prompt_length: int, num_blocks: int, block_length: int,
                     label: str, thresholds, seed: int) -> dict:
    """Denoising traces of one batch of windows ``[b, P + n·B]`` (see the module docstring).

    Returns numpy arrays with one entry per (row, block, pass): ``row``, ``block``, ``step``,
    ``features [N, B, F]``, ``ids [N, B, 4]``, ``masked [N, B]``, ``label [N, B]``.
    """
    P, B, nB = prompt_length, block_length, num_blocks
    mask_id = model.config.mask_token_id
    windows = windows.to(model.device)
    prompt = windows[:, :P]
    b = prompt.shape[0]
    if label == "ar":
        out, _ = model.ar_generate(prompt, nB * B, eos_token_id=-1)
        ref = out[:, P:]
    elif label == "ground_truth":
        ref = windows[:, P:P + nB * B]
    else:
        raise ValueError(f"label must be 'ar' or 'ground_truth', got {label!r}")
    if ref.shape[1] != nB * B:
        raise ValueError(f"windows hold {windows.shape[1]} tokens, need {P + nB * B}")
    g = torch.Generator().manual_seed(seed)
    thr_values = torch.tensor([float(x) for x in thresholds])
    rec = {k: [] for k in ("row", "block", "step", "features", "ids", "masked", "label")}
    cache = model.new_cache(b, P + nB * B)
    logits = model.causal_pass(prompt, cache, logits_to_keep=1)
    for k in range(nB):
        block = torch.full((b, B), mask_id, dtype=torch.long, device=model.device)
        block[:, 0] = model.pick_tokens(logits[:, -1])
        thr = thr_values[torch.randint(len(thr_values), (b,), generator=g)].to(model.device)
        ref_b = ref[:, k * B:(k + 1) * B]
        step = 0
        while (masked := block == mask_id).any():
            lb = model.block_pass(block, cache)
            num, ids, top1 = block_features(lb, block, mask_id, step)
            rows = masked.any(1)
            rec["row"].append(rows.nonzero()[:, 0].cpu())
            rec["block"].append(torch.full((int(rows.sum()),), k))
            rec["step"].append(torch.full((int(rows.sum()),), step))
            rec["features"].append(num[rows].cpu())
            rec["ids"].append(ids[rows].cpu())
            rec["masked"].append(masked[rows].cpu())
            rec["label"].append((top1 == ref_b)[rows].cpu())
            cand = model.pick_tokens(lb)
            conf = model.confidence(lb, cand)
            commit = masked & ((conf >= thr[:, None]) | top1_mask(conf, masked))
            block = torch.where(commit, cand, block)
            step += 1
        logits = model.causal_pass(ref_b, cache, logits_to_keep=1)   # teacher-forced KV-write of the reference
    return {k: torch.cat(v).numpy() for k, v in rec.items()}


def _data_signature(cfg) -> dict:
    s, a = cfg.sampler, cfg.addon
    return {"base_model": str(Path(a.base_model).resolve()), "label": s.label, "num_sequences": s.num_sequences,
            "prompt_length": s.prompt_length, "num_blocks": s.num_blocks, "block_length": s.block_length,
            "behaviour_thresholds": [float(x) for x in s.behaviour_thresholds], "token_dim": s.token_dim,
            "seed": cfg.train.seed, "holdout_fraction": a.holdout_fraction, "data_path": str(cfg.data.path)}


def generate_sampler_data(cfg, model, data_dir, log=print) -> Path:
    """Write the shard set into ``data_dir`` (via ``tmp.<name>``, renamed when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    s, a = cfg.sampler, cfg.addon
    out = Path(data_dir)
    tmp = atomic.begin(out)  # a leftover of an interrupted run is removed
    t0 = time.time()
    windows = token_windows(cfg.data.path, s.num_sequences, s.prompt_length + s.num_blocks * s.block_length,
                            cfg.train.seed, a.holdout_fraction, holdout=False,
                            vocab_size=model.config.vocab_size)
    n_examples = 0
    for shard, i in enumerate(range(0, len(windows), a.gen_batch_size)):
        rec = record_denoising(model, windows[i:i + a.gen_batch_size], s.prompt_length, s.num_blocks,
                               s.block_length, s.label, s.behaviour_thresholds, cfg.train.seed + shard)
        n = len(rec["row"])
        table = pa.table({
            "window": pa.array(rec["row"] + i, pa.int64()), "block": pa.array(rec["block"], pa.int32()),
            "step": pa.array(rec["step"], pa.int32()),
            "features": pa.array(list(rec["features"].reshape(n, -1).astype(np.float32)), pa.list_(pa.float32())),
            "ids": pa.array(list(rec["ids"].reshape(n, -1)), pa.list_(pa.int64())),
            "masked": pa.array(list(rec["masked"]), pa.list_(pa.bool_())),
            "label": pa.array(list(rec["label"]), pa.list_(pa.bool_())),
        })
        pq.write_table(table, tmp / f"train-{shard:05d}.parquet")
        n_examples += n
    table = token_table_from_embeddings(model.model.embed_tokens.weight, s.token_dim, seed=cfg.train.seed)
    save_file({"token_table": table.contiguous()}, str(tmp / "token_table.safetensors"))
    info = {"num_examples": n_examples, "num_windows": len(windows), "block_length": s.block_length,
            "num_features": NUM_FEATURES, "feature_names": list(FEATURE_NAMES), "token_slots": TOKEN_SLOTS,
            "vocab_size": model.config.vocab_size, "mask_token_id": model.config.mask_token_id,
            "config": _data_signature(cfg)}
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        raise DataError(f"{out} appeared while generating sampler data; not overwriting it")
    atomic.publish(tmp, out, replace=False)
    log(f"sampler data: {n_examples} denoise passes from {len(windows)} windows -> {out} ({time.time() - t0:.1f} s)")
    return out


def load_sampler_data(data_dir) -> dict:
    """The shard set as tensors: ``features [N, B, F]``, ``ids [N, B, 4]``, ``masked``, ``label``, ``window``."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file
    d = Path(data_dir)
    info_path = d / "info.json"
    if not info_path.is_file():
        raise DataError(f"{d} is not a sampler data folder (no info.json)")
    info = json.loads(info_path.read_text())
    files = sorted(d.glob("train-*.parquet"))
    if not files:
        raise DataError(f"{d} holds no train-*.parquet shards")
    B, F = info["block_length"], info["num_features"]
    cols = {k: [] for k in ("window", "step", "features", "ids", "masked", "label")}
    for f in files:
        t = pq.read_table(f)
        for k in cols:
            c = t.column(k).combine_chunks()
            cols[k].append(c.flatten().to_numpy(zero_copy_only=False) if k in ("features", "ids", "masked", "label")
                           else c.to_numpy())
    out = {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}
    n = len(out["window"])
    out["features"] = out["features"].view(n, B, F).float()
    out["ids"] = out["ids"].view(n, B, TOKEN_SLOTS).long()
    out["masked"] = out["masked"].view(n, B).bool()
    out["label"] = out["label"].view(n, B).bool()
    if n != info["num_examples"]:
        raise DataError(f"{d}: info.json says {info['num_examples']} examples, the shards hold {n}")
    out["token_table"] = load_file(str(d / "token_table.safetensors"))["token_table"]
    out["info"] = info
    return out


def bce_sum(model: SamplerModel, features, ids, masked, label):
    """Sum of the binary cross-entropy over masked positions, and the number of correct predictions."""
    logit = model(features, ids)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit[masked], label[masked].float(), reduction="sum")
    correct = ((logit[masked] > 0) == label[masked]).sum()
    return loss, correct


@torch.no_grad()
def evaluate(model: SamplerModel, data: dict, idx: torch.Tensor, batch: int = 512) -> dict:
    model.eval()
    loss = correct = n = hi = hi_ok = 0.0
    for i in range(0, len(idx), batch):
        j = idx[i:i + batch]
        m, lab = data["masked"][j], data["label"][j]
        logit = model(data["features"][j], data["ids"][j])
        loss += float(torch.nn.functional.binary_cross_entropy_with_logits(logit[m], lab[m].float(), reduction="sum"))
        correct += float(((logit[m] > 0) == lab[m]).sum())
        n += float(m.sum())
        p = torch.sigmoid(logit[m])
        hi += float((p >= 0.9).sum())
        hi_ok += float(((p >= 0.9) & lab[m]).sum())
    return {"val_loss": loss / max(n, 1), "val_acc": correct / max(n, 1), "val_positions": int(n),
            "val_frac_scored_ge_0.9": hi / max(n, 1), "val_precision_ge_0.9": hi_ok / max(hi, 1)}


def build_sampler(cfg, data: dict) -> SamplerModel:
    s, info = cfg.sampler, data["info"]
    torch.manual_seed(cfg.train.seed)    # parameters drawn under the run's seed
    model = SamplerModel(SamplerModelConfig(
        vocab_size=info["vocab_size"], mask_token_id=info["mask_token_id"], token_dim=s.token_dim,
        d_model=s.d_model, num_layers=s.num_layers, num_heads=s.num_heads, ffn_hidden_size=s.ffn_hidden_size,
        label=s.label))
    with torch.no_grad():
        model.token_table.copy_(data["token_table"])
        feats = data["features"][data["masked"]]
        model.feature_mean.copy_(feats.mean(0))
        model.feature_std.copy_(feats.std(0).clamp(min=1e-4))
    return model


def train_sampler(cfg, log=print) -> Path:
    """``nld-train recipe=sampler``: data (generated unless present), training, ``<run.dir>/sampler/``."""
    run_dir = Path(cfg.run.dir)
    data_dir = Path(cfg.sampler.data_dir) if cfg.sampler.data_dir else run_dir / "sampler_data"
    if not (data_dir / "info.json").is_file():
        lm = load_model(cfg.addon.base_model)
        log(f"generating sampler data with {cfg.addon.base_model} (label={cfg.sampler.label})")
        generate_sampler_data(cfg, lm, data_dir, log)
        del lm
    data = load_sampler_data(data_dir)
    sig, want = data["info"]["config"], _data_signature(cfg)
    diff = [k for k in DATA_KEYS if sig.get(k) != want.get(k)]
    if diff:
        raise DataError(f"sampler data in {data_dir} was generated with other settings ({', '.join(diff)}); "
                        "delete it, or set sampler.data_dir to another folder")
    windows = data["window"]
    cut = int(windows.max()) * 9 // 10 if len(windows) else 0
    train_idx = (windows < cut).nonzero()[:, 0]
    val_idx = (windows >= cut).nonzero()[:, 0]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"sampler data in {data_dir} is too small to split into training and validation windows")
    model = build_sampler(cfg, data)
    mb = cfg.train.micro_batch_size

    def micro_batches(indices):
        j = train_idx[torch.tensor(indices)]
        return [(j[i:i + mb], float(data["masked"][j[i:i + mb]].sum())) for i in range(0, len(j), mb)]

    def loss_sum(j):
        loss, correct = bce_sum(model, data["features"][j], data["ids"][j], data["masked"][j], data["label"][j])
        return loss, {"acc": correct}

    fit(cfg, model, len(train_idx), micro_batches, loss_sum, log)
    val = evaluate(model, data, val_idx)
    pos_rate = float(data["label"][val_idx][data["masked"][val_idx]].float().mean())
    log("sampler validation: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in val.items()) + f", label base rate {pos_rate:.4f}")
    out = save_sampler(model, run_dir / ARTIFACT_DIR, extra={"base_model": cfg.addon.base_model,
                                                             "validation": {**val, "label_base_rate": pos_rate},
                                                             "train": asdict(cfg.train)})
    log(f"sampler saved to {out}")
    install_artifact(cfg, out, log)
    return out
