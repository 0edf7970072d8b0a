"""``nld-convert from-hf``: a Hugging Face folder or a GGUF file -> an nld-train checkpoint (``checkpoint.init_from``).

Reads Llama, Mistral, Qwen2 and Ministral-3 causal LMs (standard names), the public
Nemotron-Labs-Diffusion layout (``encoder.*``, ``diffusion_head``) and our own exports; refuses
what the NLD model cannot compute exactly (sliding windows, other RoPE types, biases other than
q/k/v, ...), naming the config field. The output folder::

    <out>/checkpoints/step_00000000/   a weights-only megatron dist checkpoint (+ latest)
    <out>/tokenizer/                   the tokenizer with the mask token registered (if the source has one)
    <out>/model.yaml                   its `model` config group, for reading (``checkpoint.init_from`` takes the
                                       model and the tokenizer from the checkpoint itself)

Tied embeddings are untied (the output layer starts as a copy of the embeddings, as NLD's stage 1
does). The checkpoint's vocabulary is padded for ``--tp N`` (128 x N rows); any TP layout loads it
through megatron's resharding as long as the padded size matches.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nld_train import checkpoint as ckpt
from nld_train.atomic import atomic_dir
from nld_train.config import (
    Config,
    ModelConfig,
    ObjectiveConfig,
    ParallelConfig,
    RopeScalingConfig,
    TokenizerConfig,
    model_shape,
)
from nld_train.dist import init_distributed, preserved_environ
from nld_train.errors import CheckpointError, InputError
from nld_train.inference.hf_format import iter_plain_to_megatron, read_hf_folder


def model_config_from_nld(cfg, name: str):
    """:class:`NLDConfig` -> nld_train.config.ModelConfig (inverse of loading.nld_config_from_model_config)."""
    standard = cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    return ModelConfig(
        name=name, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=None if standard else cfg.head_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings, norm_epsilon=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=RopeScalingConfig(**(cfg.rope_scaling or {})),
        query_scaling_beta=cfg.query_scaling_beta, mask_token_id=cfg.mask_token_id, qkv_bias=cfg.attention_bias)


def save_weights_only(run_dir: Path, model, meta: dict) -> Path:
    """Collective. A step-0 dist checkpoint with the model only (no optimizer), committed like the trainer's."""
    return ckpt.save(run_dir, 0, model, None, meta, keep_last=1)


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """A GGUF file -> a plain HF folder in fp32 (config, safetensors, its tokenizer if it has one),
    dequantised by transformers (needs the ``gguf`` package: ``pip install -e .[gguf]``). A model
    loaded from GGUF refuses ``save_pretrained`` ("quantized with gguf"), so its tensors are assigned
    (not copied) to a model built on the meta device from the same config, which saves normally."""
    import importlib.util
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"{gguf_file}: reading a GGUF file needs the gguf package (pip install -e '.[gguf]')")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        has_tokenizer = "tokenizer.ggml.model" in gguf.GGUFReader(str(gguf_file)).fields
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, RuntimeError, OSError, KeyError) as e:   # not GGUF, an unsupported architecture, shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{gguf_file}: transformers cannot load it as a causal LM "
                         f"({type(e).__name__}: {first})") from None
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):   # it is plain fp32 from here on
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    del loaded
    model.tie_weights()
    model.save_pretrained(str(out_dir))
    del model
    if has_tokenizer:
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(out_dir))


ADDED_PAD_TOKEN = "<|nld_pad|>"


def ensure_pad_token(tok, cfg, sd: dict) -> int:
    """Training needs a pad token distinct from EOS (megatron fills short samples with it and masks
    its positions out of the loss, so it must be a token that real text never holds). A tokenizer
    without one, or one that pads with EOS (SmolLM2), gets a new special token ``<|nld_pad|>``; past
    the vocabulary, the embedding and output rows grow by one (the mean of the existing rows, as
    for ``--add-mask-token``). Returns the number of rows added."""
    if tok is None or (tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id):
        return 0
    why = "has no pad token" if tok.pad_token_id is None else f"pads with EOS (id {tok.eos_token_id})"
    tok.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    grow = max(0, tok.pad_token_id + 1 - cfg.vocab_size)
    for k in ("model.embed_tokens.weight", "lm_head.weight") if grow else ():
        w = sd[k]
        sd[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)], 0)
    cfg.vocab_size += grow
    print(f"the tokenizer {why}: added {ADDED_PAD_TOKEN} as its pad token (id {tok.pad_token_id}"
          + (f", {grow} embedding row(s) added)" if grow else ")"))
    return grow


def from_hf(hf_dir, out_dir, tp: int = 1, mask_token_id: Optional[int] = None, add_mask_token: bool = False) -> Path:
    """Convert the HF folder ``hf_dir`` into ``out_dir`` (see the module doc); returns the step dir.
    ``os.environ`` is left as it was (a 1-process group needs no rendezvous variables)."""
    with preserved_environ():
        return _from_hf(hf_dir, out_dir, tp, mask_token_id, add_mask_token)


def _from_hf(hf_dir, out_dir, tp: int, mask_token_id: Optional[int], add_mask_token: bool) -> Path:
    from omegaconf import OmegaConf

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1:
        raise InputError(f"--tp must be >= 1, got {tp}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty: choose another folder or remove it")
    if hf_dir.is_file():   # a GGUF file: dequantised to a plain HF folder next to the output first
        if hf_dir.suffix.lower() != ".gguf":
            raise InputError(f"{hf_dir} is a file: from-hf reads an HF folder or a .gguf file")
        staged = out_dir.parent / f".{out_dir.name}.gguf-{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        try:
            gguf_to_hf(hf_dir, staged)
            cfg, sd, tok, info = read_hf_folder(staged, mask_token_id, add_mask_token)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        info.update(path=str(hf_dir.resolve()), gguf=True)
    else:
        cfg, sd, tok, info = read_hf_folder(hf_dir, mask_token_id, add_mask_token)
    info["added_pad_rows"] = ensure_pad_token(tok, cfg, sd)
    mcfg = model_config_from_nld(cfg, name=f"hf_{hf_dir.stem if hf_dir.is_file() else hf_dir.name}")
    for key, n in (("num_attention_heads", mcfg.num_attention_heads), ("num_query_groups", mcfg.num_query_groups),
                   ("ffn_hidden_size", mcfg.ffn_hidden_size)):
        if n % tp:
            raise InputError(f"--tp {tp} does not divide model.{key}={n}")
    conf = Config(model=mcfg, objective=ObjectiveConfig(block_size=cfg.block_size), recipe="from-hf",
                  parallel=ParallelConfig(tensor_model_parallel_size=tp),
                  tokenizer=TokenizerConfig(path=str((out_dir / "tokenizer").resolve()) if tok is not None else None))
    shape = model_shape(mcfg, tp)
    padded = shape["padded_vocab_size"]

    # out_dir is absent or empty (checked above): publish by one rename, never over files that appeared meanwhile
    with atomic_dir(out_dir, replace=False) as tmp:
        from megatron.core import parallel_state as ps
        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            init_distributed(1)
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise InputError("from-hf builds a TP=1 model; run it outside a TP > 1 process group")
        from nld_train.model.gpt import build_model  # lazy: megatron (see pyproject.toml)
        # a TP=1 model whose vocabulary is padded as a TP=N run pads it (128 x N rows)
        build_cfg = dataclasses.replace(mcfg, make_vocab_size_divisible_by=mcfg.make_vocab_size_divisible_by * tp)
        with torch.random.fork_rng(devices=[]):
            model = build_model(build_cfg, ParallelConfig(), mcfg.max_position_embeddings, seed=0)
        # tensor by tensor into the model's parameters, each source tensor dropped after its last
        # use: the weights are held once as the model and once (shrinking) as the source
        target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        with torch.no_grad():
            try:
                for name, t in iter_plain_to_megatron(sd, cfg, list(target), padded, consume=True, dtype=torch.float32):
                    if t.shape != target[name].shape:
                        raise CheckpointError(f"{hf_dir}: {name} has shape {tuple(t.shape)}, the model its config "
                                              f"describes expects {tuple(target[name].shape)}")
                    target[name].copy_(t)
            except KeyError as e:  # names: a tensor missing, or one the model has no place for
                raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
        del sd
        meta = {"config": dataclasses.asdict(conf), "weights_only": True, "recipe": "from-hf",
                "model_shape": shape,
                "tensor_model_parallel_size": tp, "consumed_samples": 0, "hf_source": info}
        step = save_weights_only(tmp, model, meta)
        del model
        if tok is not None:
            tok.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "model.yaml").write_text(
            "# the model group of this checkpoint; checkpoint.init_from=<this folder> takes it (and the tokenizer)\n"
            "# from the checkpoint. A copy in recipes/model/<name>.yaml only serves to train this shape from scratch.\n"
            + OmegaConf.to_yaml(OmegaConf.structured(mcfg)))
    step = out_dir / step.relative_to(tmp)
    print(f"converted {hf_dir} ({info['model_type']}, layout {info['layout']}) -> {step}; mask token id "
          f"{cfg.mask_token_id}, vocab {cfg.vocab_size} (padded {padded} for TP={tp})")
    return step
