"""What a run tells the world: progress lines, metrics.jsonl, wandb, provenance.

Only rank 0 writes. On resume, metric lines of steps after the restored checkpoint are dropped so
every step appears exactly once in ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Optional

from nld_train.config import padded_vocab_size


class MetricsLog:
    def __init__(self, run_dir, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():  # keep lines up to the restored step, drop the rest atomically
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def progress_line(row: dict, max_steps: int, eta_s: Optional[float]) -> str:
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}"]
    if row.get("loss_ar") is not None:
        parts.append(f"loss_ar {row['loss_ar']:.4f}")
    if row.get("loss_diff") is not None:
        parts.append(f"loss_diff {row['loss_diff']:.4f}")
    parts += [f"lr {row['lr']:.3e}", f"grad_norm {row['grad_norm']:.3f}",
              f"tok/s {row['tokens_per_s']:.0f}"]
    for key in ("val_loss_ar", "val_loss_diff"):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {_hms(eta_s)}")
    return " | ".join(parts)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train_flops_per_token(m, seq_len: int, objective, tp: int = 1) -> float:
    """Model FLOPs of forward + backward per *data* token, counted the way Megatron-LM's
    ``num_floating_point_operations`` counts them (tested against a transcription of it):
    every GEMM three times (forward, wgrad, dgrad) at 2 FLOPs per multiply-add, QKV / out / SwiGLU
    MLP / logits over the padded vocabulary, and attention only over the key positions the mask
    lets a query see (causal: S/2 keys per token; embeddings, norms and softmax not counted).

    The ``objective`` (nld_train.objective) says how many model tokens a sample of ``seq_len`` data
    tokens becomes (every GEMM runs once per model token: twice for the joint 2L layout) and how
    many keys a data token attends to (``attended_keys``: L/2 for AR, L + B/2 for joint).
    ``tp`` matters only through the vocabulary padding.
    """
    h = m.hidden_size
    head_dim = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * m.ffn_hidden_size   # QKV, out proj, gate/up + down
    linear = m.num_layers * per_layer + h * padded_vocab_size(m, tp)    # + logits; embedding is a lookup
    copies, keys = objective.tokens_per_sample(seq_len) // seq_len, objective.attended_keys(seq_len)
    return 6 * (copies * linear + m.num_layers * 2 * q * keys)          # attention: QK^T and AV


# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s per GPU, from NVIDIA's datasheets, keyed by
# the exact name torch.cuda.get_device_name() reports. Exact names only: "H100" alone would match
# the PCIe (756) and NVL (835) parts and MIG slices, whose peaks are far below the SXM's 989.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,     # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4,               # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100-PCIE-80GB": 312.0,     # older drivers' name of the 80 GB PCIe card
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA GB200": 2500.0,             # the Blackwell GPU of a GB200 superchip
}


def peak_tflops_for(device_name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak TFLOP/s, why) for a CUDA device name; (None, reason) when unknown.

    A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") gets no peak: its share of the GPU's tensor
    cores depends on the profile and is not what the datasheet states.
    """
    name = " ".join(device_name.split())
    if " MIG " in f" {name} ":
        return None, f"{device_name!r} is a MIG slice (no datasheet peak)"
    for known, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() == known.lower():
            return tflops, f"{known} datasheet dense bf16 peak"
    return None, f"{device_name!r} is not in the peak table (nld_train.observability.PEAK_BF16_TFLOPS)"


def detect_peak_flops() -> tuple[Optional[float], str]:
    import torch
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    tflops, why = peak_tflops_for(torch.cuda.get_device_name())
    return (tflops * 1e12 if tflops else None), why


def resolve_peak_flops(peak_tflops: Optional[float], bf16: bool = True) -> tuple[Optional[float], str]:
    """The MFU denominator per GPU in FLOP/s, and where it comes from, for ``train.peak_tflops``.

    A configured value is used as given (the user states the peak of the hardware and precision
    they run). ``None`` = detected: the datasheet bf16 peak of a known GPU, and only for bf16 runs
    (an fp32 run measured against the bf16 peak would report a meaningless MFU). Unknown -> None:
    no MFU is printed rather than a wrong one.
    """
    if peak_tflops is not None:
        return peak_tflops * 1e12, "train.peak_tflops"
    if not bf16:
        return None, "not a bf16 run (set train.peak_tflops to measure against another peak)"
    flops, why = detect_peak_flops()
    return flops, why + ("" if flops else "; set train.peak_tflops for MFU")


def provenance(layout, caps) -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "python": sys.version.split()[0], "platform": platform.platform(), "argv": sys.argv,
        "git_commit": commit, "git_dirty": dirty,
        "versions": {p: version(p) for p in ("nld-train", "torch", "megatron-core", "transformers",
                                              "tokenizers", "hydra-core", "transformer-engine", "wandb")},
        "world": {"world_size": layout.world_size, "tp": layout.tp, "dp": layout.dp},
        "device": caps.device, "transformer_engine": caps.transformer_engine, "apex": caps.apex,
    }


class Wandb:
    """wandb, offline by default; the run id lives in the run dir so a resume continues the run."""

    def __init__(self, cfg, run_dir, config_dict: dict, recipe: str = ""):
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        name = cfg.name or "-".join(x for x in (recipe, Path(run_dir).name) if x)
        self.run = wandb.init(project=cfg.project, name=name, id=run_id,
                              resume="allow", mode=cfg.mode, dir=str(run_dir), config=config_dict)

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
