"""LoRA drafter (spec §3.6): a low-rank update of every attention output projection (``o_proj``) that
is active only in draft passes of self-speculation. Depends only on torch (safetensors to save/load),
so it ships with the decoding code as remote code; peft is not needed.

The adapter never touches the base model's parameters or its ``state_dict``: while attached (a
context manager) it adds ``scale * B(A(x))`` to each ``o_proj`` output through forward hooks, gated
by :attr:`LoRAAdapter.gate`:

- ``None`` / ``False``: off (prefill, verify, KV-write passes: the verifier is the plain model);
- ``True``: on for every token of the forward (linear self-spec draft passes);
- a bool tensor ``[b, s]``: on for the marked tokens only (the quadratic decoder's mask tokens,
  while its anchors, which are verifier tokens, stay plain).

Saved in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.self_attn.o_proj.lora_{A,B}.weight``), so the folder is the
``linear_spec_lora/`` of an HF export and loads with ``PeftModel.from_pretrained`` as well.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

ARTIFACT_DIR = "linear_spec_lora"       # <run.dir>/linear_spec_lora/ and the HF export's subfolder
TARGET = "o_proj"
_KEY = "base_model.model.model.layers.{i}.self_attn.o_proj.lora_{ab}.weight"


class LoRAAdapter(nn.Module):
    """``A[i] [r, in]``, ``B[i] [out, r]`` per layer; ``delta = (alpha / r) * x A^T B^T``."""

    def __init__(self, num_layers: int, in_features: int, out_features: int, rank: int = 128,
                 alpha: float = 512.0, seed: int = 0):
        super().__init__()
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"LoRA rank and alpha must be positive, got rank={rank} alpha={alpha}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(in_features)   # peft's default: kaiming-uniform A, zero B (starts as a no-op)
        self.A = nn.ParameterList(nn.Parameter((torch.rand(rank, in_features, generator=g) * 2 - 1) * bound)
                                  for _ in range(num_layers))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(out_features, rank)) for _ in range(num_layers))
        self.gate: Union[None, bool, torch.Tensor] = None
        self.base_model: Optional[str] = None

    @classmethod
    def for_model(cls, model, rank: int = 128, alpha: float = 512.0, seed: int = 0) -> "LoRAAdapter":
        o = model.model.layers[0].self_attn.o_proj
        return cls(len(model.model.layers), o.in_features, o.out_features, rank, alpha, seed)

    def check(self, model) -> None:
        o = model.model.layers[0].self_attn.o_proj
        if len(self.A) != len(model.model.layers) or self.A[0].shape[1] != o.in_features \
                or self.B[0].shape[0] != o.out_features:
            raise ValueError(f"LoRA adapter ({len(self.A)} layers, {self.A[0].shape[1]} -> {self.B[0].shape[0]}) "
                             f"does not fit the model ({len(model.model.layers)} layers, o_proj "
                             f"{o.in_features} -> {o.out_features})")

    def _hook(self, i: int):
        def hook(module, inputs, output):
            g = self.gate
            if g is None or g is False:
                return output
            x = inputs[0]
            a, b = self.A[i].to(x.dtype), self.B[i].to(x.dtype)
            delta = (x @ a.t()) @ b.t() * self.scale
            if isinstance(g, torch.Tensor):
                delta = delta * g[..., None].to(delta.dtype)
            return output + delta
        return hook

    @contextlib.contextmanager
    def attached(self, model):
        """Hooks on every layer's ``o_proj`` for the duration of the block; the gate starts off."""
        self.check(model)
        handles = [layer.self_attn.o_proj.register_forward_hook(self._hook(i))
                   for i, layer in enumerate(model.model.layers)]
        self.gate = None
        try:
            yield self
        finally:
            self.gate = None
            for h in handles:
                h.remove()

    # -- save / load -------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        """PEFT-layout folder, written to a temporary folder and renamed into place."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        # nld_train.atomic.atomic_dir by hand: this module is shipped as HF remote code (torch only)
        tmp = out.with_name(f"tmp.{out.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {}
        for i in range(len(self.A)):
            state[_KEY.format(i=i, ab="A")] = self.A[i].detach().float().contiguous().cpu()
            state[_KEY.format(i=i, ab="B")] = self.B[i].detach().float().contiguous().cpu()
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": [TARGET],
               "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
               "inference_mode": True, "modules_to_save": None, "task_type": None,
               "base_model_name_or_path": self.base_model,
               "nld": {"active_in": "draft passes only", "num_layers": len(self.A)}}
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        if out.exists():
            os.replace(out, out.with_name(f"trash.{out.name}"))
            shutil.rmtree(out.with_name(f"trash.{out.name}"))
        os.replace(tmp, out)
        return out


def find_adapter_dir(path) -> Path:
    p = Path(path)
    for d in (p, p / ARTIFACT_DIR):
        if (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file():
            return d
    raise FileNotFoundError(f"no LoRA adapter at {p} (expected adapter_config.json + adapter_model.safetensors "
                            f"in it or in {p / ARTIFACT_DIR})")


def load_adapter(path, device="cpu") -> LoRAAdapter:
    """A PEFT-layout LoRA folder (ours, or any with o_proj-only targets and our key names)."""
    from safetensors.torch import load_file
    d = find_adapter_dir(path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or list(cfg.get("target_modules") or []) != [TARGET]:
        raise ValueError(f"{d}: expected a LORA adapter on {TARGET!r} only, got peft_type={cfg.get('peft_type')!r} "
                         f"target_modules={cfg.get('target_modules')!r}")
    state = load_file(str(d / "adapter_model.safetensors"))
    n = len([k for k in state if k.endswith("lora_A.weight")])
    try:
        A0, B0 = state[_KEY.format(i=0, ab="A")], state[_KEY.format(i=0, ab="B")]
    except KeyError:
        raise ValueError(f"{d}: adapter keys are not {_KEY.format(i=0, ab='A')!r}-style") from None
    ad = LoRAAdapter(n, A0.shape[1], B0.shape[0], int(cfg["r"]), float(cfg["lora_alpha"]))
    with torch.no_grad():
        for i in range(n):
            ad.A[i].copy_(state[_KEY.format(i=i, ab="A")])
            ad.B[i].copy_(state[_KEY.format(i=i, ab="B")])
    ad.base_model = cfg.get("base_model_name_or_path")
    return ad.to(device).requires_grad_(False)


_LOADED: dict = {}   # (folder, mtime, device) -> LoRAAdapter: a path passed on every call loads once


def as_adapter(lora, model) -> Optional[LoRAAdapter]:
    """``lora=`` of the decoders: None/False (no adapter), a path (loaded once per folder version), or a LoRAAdapter."""
    if lora is None or lora is False:
        return None
    if isinstance(lora, (str, os.PathLike)):
        d = find_adapter_dir(lora)
        key = (str(d.resolve()), (d / "adapter_model.safetensors").stat().st_mtime_ns, str(model.device))
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = load_adapter(d, model.device)
        lora = _LOADED[key]
    ad = lora
    if not isinstance(ad, LoRAAdapter):
        raise TypeError(f"lora= must be a path or a LoRAAdapter, got {type(lora).__name__}")
    ad.check(model)
    return ad
