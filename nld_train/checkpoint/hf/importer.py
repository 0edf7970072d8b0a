"""``nld-convert from-hf``: a Hugging Face folder -> an nld-train checkpoint (``checkpoint.init_from``).

Reads Llama, Mistral, Qwen2 and Ministral-3 causal LMs (standard names), the public
Nemotron-Labs-Diffusion layout (``encoder.*``, ``diffusion_head``) and our own exports; refuses
what the NLD model cannot compute exactly (sliding windows, other RoPE types, biases other than
q/k/v, ...), naming the config field. The output folder::

    <out>/checkpoints/step_00000000/   a weights-only megatron dist checkpoint (+ latest)
    <out>/tokenizer/                   the tokenizer with the mask token registered (if the source has one)
    <out>/model.yaml                   the matching `model` config group (copy into recipes/model/)

Tied embeddings are untied (the output layer starts as a copy of the embeddings, as NLD's stage 1
does). The checkpoint's vocabulary is padded for ``--tp N`` (128 x N rows); any TP layout loads it
through megatron's resharding as long as the padded size matches.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from nld_train.atomic import atomic_dir
from nld_train.checkpoint.hf.mapping import from_layout
from nld_train.errors import CheckpointError, ConfigError, DataError, InputError

ADDED_MASK_TOKEN = "<|nld_mask|>"
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp32"}  # fp16 is kept exactly in fp32


def read_hf_config(hf_dir) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{hf_dir} is not an HF model folder (no config.json)")
    try:
        d = json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    if "text_config" in d and "num_hidden_layers" not in d:
        raise ConfigError(f"{p}: a multimodal config (text_config); convert the text model's own folder")
    return d


def read_hf_weights(hf_dir) -> dict:
    """All tensors of the folder's safetensors files (sharded with an index, or single)."""
    from safetensors.torch import load_file
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in hf_dir.glob("*.bin"))
        raise CheckpointError(f"{hf_dir} is not a loadable HF export or model folder: it holds no safetensors weights" + (
            f" (only {bins}: convert them to safetensors first)" if bins else ""))
    out = {}
    for f in files:
        if not (hf_dir / f).is_file():
            raise CheckpointError(f"{hf_dir / f} is named in the index but missing")
        out.update(load_file(str(hf_dir / f)))
    return out


def layout_of(d: dict, names) -> str:
    from nld_train.inference.hf_wrapper import NLD_PUBLIC_MODEL_TYPE
    if d.get("model_type") == NLD_PUBLIC_MODEL_TYPE or any(n.startswith("encoder.") for n in names):
        return "nld"
    return "hf"


def _hf_tokenizer(hf_dir):
    hf_dir = Path(hf_dir)
    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # a broken tokenizer is the input's fault: say which and why
        raise DataError(f"the tokenizer of {hf_dir} does not load: {type(e).__name__}: {e}") from None


def resolve_mask(d: dict, tok, mask_token_id: Optional[int], add_mask_token: bool, vocab_size: int):
    """-> (mask id, tokenizer or None, number of embedding rows to add). See docs/conversion.md."""
    tok_mask = getattr(tok, "mask_token_id", None) if tok is not None else None
    if add_mask_token:
        if mask_token_id is not None:
            raise InputError("--add-mask-token and --mask-token-id exclude each other")
        if tok is None:
            raise InputError("--add-mask-token needs a tokenizer in the folder (to add the token to)")
        if tok_mask is not None:
            raise InputError(f"the tokenizer already has a mask token (id {tok_mask}); drop --add-mask-token")
        tok.add_special_tokens({"mask_token": ADDED_MASK_TOKEN})
        new_id = tok.mask_token_id
        return new_id, tok, max(0, new_id + 1 - vocab_size)
    if mask_token_id is None:
        m = d.get("mask_token_id")
        mask_token_id = int(m) if m is not None and int(m) >= 0 else tok_mask
    if mask_token_id is None:
        raise InputError("no mask token: the tokenizer has none and the config names none; pick an existing "
                         "(reserved) token with --mask-token-id N, or add one with --add-mask-token")
    if not 0 <= mask_token_id < vocab_size:
        raise InputError(f"--mask-token-id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
    if tok is not None:
        if tok_mask is None:   # register the existing token as the mask (as the published models' id 100)
            tok.add_special_tokens({"mask_token": tok.convert_ids_to_tokens(mask_token_id)})
        if tok.mask_token_id != mask_token_id:
            raise InputError(f"the tokenizer's mask token is id {tok.mask_token_id}, not {mask_token_id}; "
                             f"pass --mask-token-id {tok.mask_token_id} (or nothing)")
    return mask_token_id, tok, 0


def read_hf_folder(hf_dir, mask_token_id: Optional[int] = None, add_mask_token: bool = False,
                   tokenizer: bool = True):
    """An HF folder -> (NLDConfig, plain state dict (fp32 unless the file's dtype), tokenizer or None, info).

    Tied embeddings come back as an explicit ``lm_head.weight`` copy; ``--add-mask-token`` rows
    are appended with the mean of the existing rows.
    """
    from nld_train.inference import hf_wrapper as W
    d = read_hf_config(hf_dir)
    raw = read_hf_weights(hf_dir)
    layout = layout_of(d, raw)
    sd = {from_layout(k, layout): v for k, v in raw.items()}
    del raw
    tok = _hf_tokenizer(hf_dir) if tokenizer else None
    if tok is not None and len(tok) > int(d["vocab_size"]) and not add_mask_token:
        raise DataError(f"the tokenizer of {hf_dir} has {len(tok)} tokens, the config's vocab_size is {d['vocab_size']}")
    mask, tok, grow = resolve_mask(d, tok, mask_token_id, add_mask_token, int(d["vocab_size"]))
    try:
        cfg = W.nld_config_from_hf(d, mask_token_id=mask)
    except W.UnsupportedModelError as e:
        raise ConfigError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    if W.hf_tied(d) or "lm_head.weight" not in sd:
        if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            raise CheckpointError(f"{hf_dir}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
        if not W.hf_tied(d):
            raise CheckpointError(f"{hf_dir}: lm_head.weight is missing and tie_word_embeddings is false")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()   # untied from here on
    if grow:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            w = sd[k]
            sd[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)], 0)
        cfg.vocab_size += grow
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    info = {"path": str(Path(hf_dir).resolve()), "model_type": d.get("model_type"), "layout": layout,
            "dtype": _DTYPE_NAMES.get(str(dtype), "fp32"), "tied": W.hf_tied(d),
            "bos_token_id": W._first(d.get("bos_token_id")), "pad_token_id": W._first(d.get("pad_token_id")),
            "added_mask_rows": grow}
    return cfg, sd, tok, info


def model_config_from_nld(cfg, name: str):
    """:class:`NLDConfig` -> nld_train.config.ModelConfig (inverse of loading.nld_config_from_model_config)."""
    from nld_train.config import ModelConfig, RopeScalingConfig
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
    from nld_train import checkpoint as ckpt
    return ckpt.save(run_dir, 0, model, None, meta, keep_last=1)


def from_hf(hf_dir, out_dir, tp: int = 1, mask_token_id: Optional[int] = None, add_mask_token: bool = False) -> Path:
    """Convert the HF folder ``hf_dir`` into ``out_dir`` (see the module doc); returns the step dir."""
    from omegaconf import OmegaConf

    from nld_train.config import Config, ObjectiveConfig, ParallelConfig, TokenizerConfig, padded_vocab_size
    from nld_train.dist import init_distributed
    from nld_train.checkpoint.hf.mapping import iter_plain_to_megatron

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1:
        raise InputError(f"--tp must be >= 1, got {tp}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty: choose another folder or remove it")
    cfg, sd, tok, info = read_hf_folder(hf_dir, mask_token_id, add_mask_token)
    mcfg = model_config_from_nld(cfg, name=f"hf_{hf_dir.name}")
    for key, n in (("num_attention_heads", mcfg.num_attention_heads), ("num_query_groups", mcfg.num_query_groups),
                   ("ffn_hidden_size", mcfg.ffn_hidden_size)):
        if n % tp:
            raise InputError(f"--tp {tp} does not divide model.{key}={n}")
    conf = Config(model=mcfg, objective=ObjectiveConfig(block_size=cfg.block_size), recipe="from-hf",
                  parallel=ParallelConfig(tensor_model_parallel_size=tp),
                  tokenizer=TokenizerConfig(path=str((out_dir / "tokenizer").resolve()) if tok is not None else None))
    padded = padded_vocab_size(mcfg, tp)

    # out_dir is absent or empty (checked above): publish by one rename, never over files that appeared meanwhile
    with atomic_dir(out_dir, replace=False) as tmp:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            init_distributed(1)
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise InputError("from-hf builds a TP=1 model; run it outside a TP > 1 process group")
        from nld_train.model.gpt import build_model
        from nld_train.train.trainer import model_shape
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
                "model_shape": {**model_shape(conf), "padded_vocab_size": padded},
                "tensor_model_parallel_size": tp, "consumed_samples": 0, "hf_source": info}
        step = save_weights_only(tmp, model, meta)
        del model
        if tok is not None:
            tok.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "model.yaml").write_text(
            "# the model group of this checkpoint: copy to recipes/model/<name>.yaml and pass model=<name>\n"
            + OmegaConf.to_yaml(OmegaConf.structured(mcfg)))
    step = out_dir / step.relative_to(tmp)
    print(f"converted {hf_dir} ({info['model_type']}, layout {info['layout']}) -> {step}; mask token id "
          f"{cfg.mask_token_id}, vocab {cfg.vocab_size} (padded {padded} for TP={tp})")
    return step


def model_overrides(mcfg) -> str:
    """``model.key=value`` overrides that reproduce ``mcfg`` on the nld-train command line."""
    from omegaconf import OmegaConf
    flat = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat.append(f"{prefix}{k}={'null' if v is None else v}")
    walk("model.", OmegaConf.to_container(OmegaConf.structured(mcfg)))
    return " ".join(flat)
