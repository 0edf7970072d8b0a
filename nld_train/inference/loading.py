"""Loading a decoder: nld-train checkpoints (run dir or step dir) -> :class:`NLDForDecoding`.

The checkpoint is read the only way that understands every tensor-parallel layout: build the
megatron training model at TP=1 in a 1-process group and let megatron's dist checkpointing reshard
into it (weights only). The weights are then copied into the plain model through a mapping table
(fused QKV split per KV group, fc1 split into gate/up, padded vocabulary rows dropped). This file
needs megatron; the model and decoding files do not.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from nld_train.checkpoint import read_meta
from nld_train.inference.decoding import NLDForDecoding
from nld_train.inference.model import NLDConfig

# megatron name -> plain (HF Llama) name(s), and how the tensor is transformed. Both megatron layer
# specs are listed: the local one (CPU) and Transformer Engine's, which fuses the pre-norms into
# the following linear layer (``layer_norm_weight``). ``{i}`` = layer index.
MEGATRON_TO_PLAIN = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab_rows"),
    ("output_layer.weight", "lm_head.weight", "vocab_rows"),
    ("decoder.final_layernorm.weight", "model.norm.weight", "copy"),
    ("decoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
     "model.layers.{i}.input_layernorm.weight", "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
     "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "fc1"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight", "copy"),
)


def _split_qkv(w: torch.Tensor, cfg: NLDConfig):
    """Megatron's fused QKV rows are grouped per KV group: [q x (heads/groups), k, v] per group."""
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // g
    w = w.view(g, (rep + 2) * hd, -1)
    q, k, v = w.split([rep * hd, hd, hd], 1)
    return q.reshape(g * rep * hd, -1), k.reshape(g * hd, -1), v.reshape(g * hd, -1)


def convert_megatron_state_dict(sd: dict, cfg: NLDConfig) -> dict:
    """A TP=1 megatron state dict -> the plain model's state dict (every target filled exactly once)."""
    rules = []
    for src, dst, how in MEGATRON_TO_PLAIN:
        pattern = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$")
        rules.append((pattern, dst, how))
    out = {}
    for name, t in sd.items():
        if name.endswith("_extra_state"):
            continue
        for pattern, dst, how in rules:
            m = pattern.match(name)
            if not m:
                continue
            fmt = (lambda s: s.format(i=m.group(1))) if m.groups() else (lambda s: s)
            t = t.detach()
            if how == "copy":
                parts = {fmt(dst): t}
            elif how == "vocab_rows":          # drop the rows padded in for tensor parallelism
                parts = {fmt(dst): t[: cfg.vocab_size]}
            elif how == "qkv":
                parts = dict(zip(map(fmt, dst), _split_qkv(t, cfg)))
            else:                              # fc1 = [gate ; up]
                parts = dict(zip(map(fmt, dst), t.chunk(2, 0)))
            out.update({k: v.clone() for k, v in parts.items()})
            break
        else:
            raise KeyError(f"no mapping for megatron parameter {name!r}")
    return out


def nld_config_from_model_config(m, eos_token_id: Optional[int] = None, block_size: int = 32) -> NLDConfig:
    """nld_train.config.ModelConfig -> NLDConfig."""
    rs = m.rope_scaling
    rs = dataclasses.asdict(rs) if dataclasses.is_dataclass(rs) else rs
    return NLDConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rope_theta, rope_scaling=None if not rs or rs.get("type") == "none" else rs,
        query_scaling_beta=m.query_scaling_beta, max_position_embeddings=m.max_position_embeddings,
        mask_token_id=m.mask_token_id, eos_token_id=eos_token_id, block_size=block_size)


def from_megatron(model, model_cfg, eos_token_id: Optional[int] = None, block_size: int = 32,
                  device=None, dtype=None) -> NLDForDecoding:
    """An in-memory TP=1 megatron model (e.g. the trainer's) -> a decoder with copied weights."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("from_megatron needs a TP=1 model; use load_model(checkpoint) for TP > 1 runs")
    cfg = nld_config_from_model_config(model_cfg, eos_token_id, block_size)
    plain = NLDForDecoding(cfg)
    missing, unexpected = plain.load_state_dict(convert_megatron_state_dict(model.state_dict(), cfg),
                                                strict=False)
    if missing or unexpected:
        raise KeyError(f"megatron -> plain mapping incomplete: missing {missing}, unexpected {unexpected}")
    plain = plain.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    plain.requires_grad_(False)
    return plain


def _run_config(step_dir: Path, meta: dict) -> dict:
    """The training config as a dict: from the checkpoint marker, else the run dir's config.yaml."""
    if meta.get("config"):
        return meta["config"]
    run_yaml = step_dir.parent.parent / "config.yaml"
    if run_yaml.is_file():
        from omegaconf import OmegaConf
        return OmegaConf.to_container(OmegaConf.load(run_yaml), resolve=True)
    raise ValueError(f"checkpoint {step_dir} holds no training config (neither in its marker nor "
                     f"{run_yaml})")


def _model_config(d: dict):
    from nld_train.config import ModelConfig, RopeScalingConfig
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    rs = kw.get("rope_scaling") or {}
    rs_known = {f.name for f in dataclasses.fields(RopeScalingConfig)}
    kw["rope_scaling"] = RopeScalingConfig(**{k: v for k, v in rs.items() if k in rs_known})
    return ModelConfig(**kw)


def resolve_checkpoint(path) -> Path:
    """A run dir / checkpoints dir / step dir -> step dir; a CheckpointError (a ValueError) otherwise."""
    from nld_train.checkpoint import CheckpointError, resolve
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "checkpoints").exists():
        raise CheckpointError(f"{p} looks like an HF export folder; loading HF exports is not implemented yet "
                              "(load it with transformers and trust_remote_code=True once nld-convert exists)")
    try:
        return resolve(p)
    except CheckpointError as e:
        raise CheckpointError(f"{p} is not an nld-train checkpoint (a run dir or a step folder): {e}") from None


def tokenizer_path(path) -> str:
    """The tokenizer folder a checkpoint was trained with (its config's tokenizer.path)."""
    step_dir = resolve_checkpoint(path)
    tok = (_run_config(step_dir, read_meta(step_dir)).get("tokenizer") or {}).get("path")
    if not tok:
        raise ValueError(f"the config of {step_dir} names no tokenizer.path")
    return tok


def load_model(path, device="cpu", dtype=None) -> NLDForDecoding:
    """A training checkpoint (run dir or step dir) -> the plain decoder with the decoding modes.

    Builds the megatron model at TP=1 (a 1-process gloo/nccl group is started if none exists), loads
    the weights only (megatron reshards any saved TP layout), and copies them into the plain model.
    The caller's RNG state is left as it was.
    """
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    conf = _run_config(step_dir, meta)
    mcfg = _model_config(conf.get("model", {}))
    block = int((conf.get("objective") or {}).get("block_size", 32))
    eos = None
    tok = (conf.get("tokenizer") or {}).get("path")
    if tok and Path(tok).is_dir():
        eos = load_tokenizer(tok).eos_token_id
    else:  # the decoder still works, but stops at EOS only if eos_token_id is passed per call
        warnings.warn(f"tokenizer {tok!r} of {step_dir} not found: no default EOS; pass eos_token_id=")

    import torch.distributed as dist

    from nld_train import checkpoint as ckpt
    from nld_train.config import ParallelConfig
    from nld_train.dist import init_distributed
    from megatron.core import parallel_state as ps

    with torch.random.fork_rng(devices=[]):
        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            init_distributed(1)
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("load_model builds a TP=1 model; call it outside a TP > 1 process group")
        from nld_train.model.gpt import build_model
        model = build_model(mcfg, ParallelConfig(), mcfg.max_position_embeddings, seed=0)
        ckpt.load(step_dir, model, None, restore_rng=False)
        plain = from_megatron(model, mcfg, eos, block, device=device, dtype=dtype)
        del model
    plain.checkpoint_path = str(step_dir)
    return plain


def load_tokenizer(path):
    """An HF tokenizer: a tokenizer folder, or the one a checkpoint (run/step dir) was trained with."""
    from nld_train.data.tokenizer import load_tokenizer as _load
    p = Path(path)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        return _load(p)
    return _load(tokenizer_path(p))
