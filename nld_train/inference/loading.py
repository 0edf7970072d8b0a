"""Loading a decoder: nld-train checkpoints (run dir or step dir) -> :class:`NLDForDecoding`.

The checkpoint is read the only way that understands every tensor-parallel layout: build the
megatron training model at TP=1 in a 1-process group and let megatron's dist checkpointing reshard
into it (weights only). The weights are then copied into the plain model through a mapping table
(fused QKV split per KV group, fc1 split into gate/up, padded vocabulary rows dropped). This file
needs megatron; the model and decoding files do not.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nld_train import checkpoint as ckpt
from nld_train.checkpoint import CheckpointError, read_meta, resolve, run_config
from nld_train.config import ParallelConfig, model_config_from_dict
from nld_train.data.tokenizer import load_tokenizer as _load_tokenizer
from nld_train.dist import init_distributed, preserved_environ
from nld_train.inference.decoding import NLDForDecoding
from nld_train.inference.hf_format import iter_megatron_to_plain, read_hf_folder
from nld_train.inference.model import NLDConfig


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
        mask_token_id=m.mask_token_id, eos_token_id=eos_token_id, block_size=block_size,
        attention_bias=getattr(m, "qkv_bias", False))


def from_megatron(model, model_cfg, eos_token_id: Optional[int] = None, block_size: int = 32,
                  device=None, dtype=None) -> NLDForDecoding:
    """An in-memory TP=1 megatron model (e.g. the trainer's) -> a decoder with copied weights."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("from_megatron needs a TP=1 model; use load_model(checkpoint) for TP > 1 runs")
    cfg = nld_config_from_model_config(model_cfg, eos_token_id, block_size)
    plain = NLDForDecoding(cfg)
    target, filled, unexpected = plain.state_dict(), set(), []
    with torch.no_grad():  # tensor by tensor: no converted copy of the whole model
        for name, t in iter_megatron_to_plain(model.state_dict(), cfg):
            if name not in target:
                unexpected.append(name)
                continue
            if t.shape != target[name].shape:
                raise KeyError(f"megatron -> plain: {name} has shape {tuple(t.shape)}, the decoder expects "
                               f"{tuple(target[name].shape)}")
            target[name].copy_(t)
            filled.add(name)
    missing = sorted(set(target) - filled)
    if missing or unexpected:
        raise KeyError(f"megatron -> plain mapping incomplete: missing {missing}, unexpected {unexpected}")
    plain = plain.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    plain.requires_grad_(False)
    return plain


def resolve_checkpoint(path) -> Path:
    """A run dir / checkpoints dir / step dir -> step dir; a CheckpointError (a ValueError) otherwise."""
    p = Path(path)
    if is_hf_folder(p):
        raise CheckpointError(f"{p} is an HF model folder, not a training checkpoint (load_model reads it; "
                              "to train from it, convert it with nld-convert from-hf)")
    try:
        return resolve(p)
    except CheckpointError as e:
        raise CheckpointError(f"{p} is not an nld-train checkpoint (a run dir or a step folder): {e}") from None


def is_hf_folder(path) -> bool:
    """An HF model folder (config.json, e.g. an nld-convert to-hf export), not a run dir."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "checkpoints").exists()


def load_hf_folder(path, device="cpu", dtype=None) -> NLDForDecoding:
    """An HF folder (our export, or a Llama/Mistral/Qwen2/Ministral-3/NLD model whose config or
    tokenizer names a mask token) -> the plain decoder, without transformers' model classes."""
    cfg, sd, _, _ = read_hf_folder(path, tokenizer=False)
    plain = NLDForDecoding(cfg)
    plain.load_state_dict(sd, strict=True)
    plain = plain.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    plain.requires_grad_(False)
    plain.checkpoint_path = str(path)
    return plain


def tokenizer_path(path) -> str:
    """The tokenizer folder a checkpoint was trained with (its config's tokenizer.path)."""
    if is_hf_folder(path):
        return str(path)
    step_dir = resolve_checkpoint(path)
    tok = (run_config(step_dir).get("tokenizer") or {}).get("path")
    if not tok:
        raise ValueError(f"the config of {step_dir} names no tokenizer.path")
    return tok


def load_model(path, device="cpu", dtype=None) -> NLDForDecoding:
    """A training checkpoint (run dir or step dir) or an HF folder -> the plain decoder with the decoding modes.

    Builds the megatron model at TP=1 (a 1-process gloo/nccl group is started if none exists), loads
    the weights only (megatron reshards any saved TP layout), and copies them into the plain model.
    The caller's RNG state and ``os.environ`` are left as they were.
    """
    with preserved_environ():
        return _load_model(path, device, dtype)


def _load_model(path, device, dtype) -> NLDForDecoding:
    if is_hf_folder(path):
        return load_hf_folder(path, device, dtype)
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    conf = run_config(step_dir, meta)
    mcfg = model_config_from_dict(conf.get("model", {}))
    block = int((conf.get("objective") or {}).get("block_size", 32))
    eos = None
    tok = (conf.get("tokenizer") or {}).get("path")
    if tok and Path(tok).is_dir():
        eos = load_tokenizer(tok).eos_token_id
    else:  # the decoder still works, but stops at EOS only if eos_token_id is passed per call
        warnings.warn(f"tokenizer {tok!r} of {step_dir} not found: no default EOS; pass eos_token_id=", stacklevel=2)

    from megatron.core import parallel_state as ps

    with torch.random.fork_rng(devices=[]):
        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            init_distributed(1)
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("load_model builds a TP=1 model; call it outside a TP > 1 process group")
        from nld_train.model.gpt import build_model  # lazy: megatron (see pyproject.toml)
        # the vocabulary padded as the saving run padded it (128 x its TP), whatever TP that was
        saved_padded = (meta.get("model_shape") or {}).get("padded_vocab_size")
        build_cfg = dataclasses.replace(mcfg, make_vocab_size_divisible_by=saved_padded) if saved_padded else mcfg
        model = build_model(build_cfg, ParallelConfig(), mcfg.max_position_embeddings, seed=0)
        ckpt.load(step_dir, model, None, restore_rng=False)
        plain = from_megatron(model, mcfg, eos, block, device=device, dtype=dtype)
        del model
    plain.checkpoint_path = str(step_dir)
    return plain


def load_tokenizer(path):
    """An HF tokenizer: a tokenizer folder, or the one a checkpoint (run/step dir) was trained with."""
    p = Path(path)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        return _load_tokenizer(p)
    return _load_tokenizer(tokenizer_path(p))
