"""Learned sampler: a small bidirectional transformer that decides which masked positions of a block
to commit after a denoise pass (spec §3.3). Depends only on torch (safetensors to save/load), so it
ships with the decoding code as remote code.

Per position of the block it reads :func:`block_features` (computed from the LM's logits of that
pass) and predicts P(the LM's current top-1 is right), "right" meaning the token the reference
decode puts there (the LM's own greedy AR continuation, or the ground-truth text; see
docs/addons.md). :class:`LearnedSamplerPolicy` plugs it into ``generate`` as a
:class:`~nld_train.inference.decoding.CommitPolicy`: commit every masked position whose score is >=
threshold, and at least the best-scoring one per pass.

Saved as a folder ``sampler/`` with ``config.json`` and ``model.safetensors`` (see
:func:`save_sampler`, :func:`load_sampler`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nld_train.inference.model import rotate
from nld_train.inference.policies import CommitPolicy, top1_mask

# numeric features per position; see block_features for the list
NUM_FEATURES = 17
FEATURE_NAMES = ("top1_p", "top2_p", "top3_p", "top4_p", "top5_p", "log_top1_p", "margin", "top3_sum",
                 "entropy", "top5_entropy", "top5_gini", "mask_p", "is_masked", "masked_ratio",
                 "rel_position", "step", "log_n_masked")
# token ids per position, looked up in the sampler's fixed token table: input token, top-1, top-2, top-3
TOKEN_SLOTS = 4
ARTIFACT_DIR = "sampler"          # <run.dir>/sampler/ and the HF export's sampler/ subfolder


@torch.no_grad()
def block_features(logits: torch.Tensor, block: torch.Tensor, mask_id: int, step: int):
    """Features of one denoise pass.

    ``logits [b, B, V]`` of the pass, ``block [b, B]`` its input tokens (``mask_id`` = still masked),
    ``step`` = index of the pass within the block (0-based). Returns ``num [b, B, 17]`` float32,
    ``ids [b, B, 4]`` long (input token, top-1, top-2, top-3) and ``top1 [b, B]`` (the argmax with
    the mask id excluded: the token that would be committed).

    Probabilities are the softmax over the whole vocabulary (mask id included, as the decoder's
    confidence); the top-k ranks exclude the mask id (it is never a candidate).
    """
    b, B, V = logits.shape
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    p_mask = p[..., mask_id]
    ranked = p.clone()
    ranked[..., mask_id] = -1.0
    top5, ids5 = ranked.topk(5, -1)
    t5 = top5 / top5.sum(-1, keepdim=True).clamp(min=1e-12)
    masked = block == mask_id
    n_masked = masked.sum(1, keepdim=True).float().expand(b, B)
    rel = torch.arange(B, device=block.device, dtype=torch.float32)[None].expand(b, B) / max(B - 1, 1)
    num = torch.stack([
        *top5.unbind(-1),
        torch.log(top5[..., 0].clamp(min=1e-12)),
        top5[..., 0] - top5[..., 1],
        top5[..., :3].sum(-1),
        entropy,
        -(t5 * torch.log(t5.clamp(min=1e-12))).sum(-1),
        1 - (top5 ** 2).sum(-1),
        p_mask,
        masked.float(),
        n_masked / B,
        rel,
        torch.full((b, B), step / B, device=block.device),
        torch.log(n_masked + 1),
    ], -1)
    ids = torch.stack([block, ids5[..., 0], ids5[..., 1], ids5[..., 2]], -1)
    return num, ids, ids5[..., 0]


def token_table_from_embeddings(embeddings: torch.Tensor, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed ``[V, dim]`` token table: the LM's input embeddings under a seeded random projection,
    standardised per column (the role of the public sampler's ``token_semantics_32d`` table)."""
    g = torch.Generator().manual_seed(seed)
    e = embeddings.detach().float().cpu()
    proj = torch.randn(e.shape[1], dim, generator=g) / math.sqrt(e.shape[1])
    t = e @ proj
    return (t - t.mean(0)) / t.std(0).clamp(min=1e-6)


@dataclass
class SamplerModelConfig:
    vocab_size: int
    mask_token_id: int
    num_features: int = NUM_FEATURES
    token_dim: int = 32
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 8
    ffn_hidden_size: int = 384
    rope_theta: float = 10000.0
    label: str = "ar"            # what "correct" meant in training: "ar" or "ground_truth"

    def __post_init__(self):
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(f"sampler d_model={self.d_model} must split into {self.num_heads} heads of even size")


class _Layer(nn.Module):
    """Pre-LN transformer layer, bidirectional over the block, RoPE + LayerNorm on queries/keys."""

    def __init__(self, c: SamplerModelConfig):
        super().__init__()
        self.nh, self.hd = c.num_heads, c.d_model // c.num_heads
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)
        self.out = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = nn.Sequential(nn.Linear(c.d_model, c.ffn_hidden_size), nn.GELU(),
                                 nn.Linear(c.ffn_hidden_size, c.d_model))

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rotate(self.q_norm(q), cos, sin), rotate(self.k_norm(k), cos, sin)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        return x + self.ffn(self.ln2(x))


class SamplerModel(nn.Module):
    """features [b, B, F] + token ids [b, B, 4] -> logit of P(top-1 is right) per position [b, B]."""

    def __init__(self, cfg: SamplerModelConfig):
        super().__init__()
        self.config = cfg
        # fixed (not trained): feature normalisation and the token table
        self.register_buffer("feature_mean", torch.zeros(cfg.num_features))
        self.register_buffer("feature_std", torch.ones(cfg.num_features))
        self.register_buffer("token_table", torch.zeros(cfg.vocab_size, cfg.token_dim))
        self.in_proj = nn.Linear(cfg.num_features + TOKEN_SLOTS * cfg.token_dim, cfg.d_model)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 1)
        hd = cfg.d_model // cfg.num_heads
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)

    def forward(self, num: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, s, _ = num.shape
        x = (num.float() - self.feature_mean) / self.feature_std
        tok = self.token_table[ids].flatten(2)
        h = self.in_proj(torch.cat([x, tok], -1))
        ang = torch.arange(s, device=num.device, dtype=torch.float32)[:, None] * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos(), ang.sin()
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.head(self.norm(h))[..., 0]

    @torch.no_grad()
    def score(self, logits: torch.Tensor, block: torch.Tensor, step: int) -> torch.Tensor:
        """P(top-1 is right) [b, B] for one denoise pass of the LM."""
        num, ids, _ = block_features(logits, block, self.config.mask_token_id, step)
        dev = self.head.weight.device
        return torch.sigmoid(self(num.to(dev), ids.to(dev))).to(logits.device)


class LearnedSamplerPolicy(CommitPolicy):
    """Commit the masked positions whose sampler score is >= ``threshold`` (at least the best one);
    tokens = the LM's candidates (argmax, mask id excluded)."""

    def __init__(self, sampler: SamplerModel, threshold: float):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"sampler threshold must be in [0, 1], got {threshold}")
        self.sampler, self.threshold = sampler, float(threshold)
        self._state = None

    def observe(self, logits, block):
        self._state = (logits, block)

    def select(self, cand, conf, masked, step, n_init, offset):
        if self._state is None:
            raise RuntimeError("LearnedSamplerPolicy.select called before observe(logits, block)")
        logits, block = self._state
        self._state = None
        score = self.sampler.score(logits, block, step)
        return (masked & (score >= self.threshold)) | top1_mask(score, masked), cand


# -- save / load -----------------------------------------------------------------------------------
def save_sampler(model: SamplerModel, out_dir, extra: Optional[dict] = None) -> Path:
    """``out_dir/config.json`` + ``model.safetensors``, written to a temporary folder and renamed
    into place (a reader never sees half a sampler)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    # nld_train.atomic.atomic_dir by hand: this module is shipped as HF remote code (torch only)
    tmp = out.with_name(f"tmp.{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"kind": "nld_learned_sampler", **asdict(model.config),
                                                 **(extra or {})}, indent=1))
    if out.exists():
        os.replace(out, out.with_name(f"trash.{out.name}"))
        shutil.rmtree(out.with_name(f"trash.{out.name}"))
    os.replace(tmp, out)
    return out


def find_sampler_dir(path) -> Path:
    """A sampler folder, or a run dir / HF export holding ``sampler/``."""
    p = Path(path)
    for d in (p, p / ARTIFACT_DIR):
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            cfg = json.loads((d / "config.json").read_text())
            if cfg.get("kind") == "nld_learned_sampler":
                return d
    raise FileNotFoundError(f"no learned sampler at {p} (expected config.json + model.safetensors in it or "
                            f"in {p / ARTIFACT_DIR})")


def load_sampler(path, device="cpu") -> SamplerModel:
    from safetensors.torch import load_file
    d = find_sampler_dir(path)
    raw = json.loads((d / "config.json").read_text())
    known = {f.name for f in fields(SamplerModelConfig)}
    model = SamplerModel(SamplerModelConfig(**{k: v for k, v in raw.items() if k in known}))
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.to(device).eval().requires_grad_(False)


_LOADED: dict = {}   # (folder, mtime, device) -> SamplerModel: a path passed on every call loads once


def as_sampler(sampler, lm) -> SamplerModel:
    """A SamplerModel or a path to one (loaded once per folder version), checked against the LM."""
    if isinstance(sampler, (str, os.PathLike)):
        d = find_sampler_dir(sampler)
        key = (str(d.resolve()), (d / "model.safetensors").stat().st_mtime_ns, str(lm.device))
        if key not in _LOADED:
            _LOADED.clear()
            _LOADED[key] = load_sampler(d, lm.device)
        sampler = _LOADED[key]
    s = sampler
    if not isinstance(s, SamplerModel):
        raise TypeError(f"sampler= must be a SamplerModel or a path, got {type(sampler).__name__}")
    c = s.config
    if c.vocab_size != lm.config.vocab_size or c.mask_token_id != lm.config.mask_token_id:
        raise ValueError(f"sampler was built for vocab {c.vocab_size} / mask id {c.mask_token_id}, the model has "
                         f"vocab {lm.config.vocab_size} / mask id {lm.config.mask_token_id}")
    return s
