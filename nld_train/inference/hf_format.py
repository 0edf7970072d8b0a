"""The Hugging Face side of the model in one place: the families, config.json <-> :class:`NLDConfig`,
the weight names (megatron <-> plain <-> HF file layouts) and reading an HF folder.

Imported by :mod:`nld_train.inference` (``load_model`` of an HF folder, ``from_megatron``), by
:mod:`nld_train.convert` (``nld-convert``) and by :mod:`.hf_wrapper`, so ``nld-convert to-hf``
copies it into the remote-code folder: it imports only torch (transformers and safetensors in the
functions that need them, so reading a folder's weights needs no transformers import) and nld_train
files that themselves import only torch (``errors``, ``inference.model``).

**A new HF family** is one :class:`HFFamily` row in :data:`FAMILIES` (its config and model class
names, its file layout and its quirks); the functions below read the record and never test a family
name. Anything the NLD model would not compute exactly is refused, naming the config field
(:class:`UnsupportedModelError`, a ValueError).

**Weight names.** Three name spaces:

- **megatron**: the training model's ``state_dict()`` at TP=1 (``decoder.layers.3.self_attention.
  linear_qkv.weight`` ...). Megatron's dist checkpoints are gathered/resharded into a TP=1 model
  first, so the per-TP-shard layouts (fc1 = ``[gate_r ; up_r]`` per rank, vocabulary split in
  rows) never reach this table: at TP=1, fc1 is ``[gate ; up]`` and QKV is grouped per query
  group ``[q x heads/groups, k, v]`` whatever TP the run used.
- **plain**: :class:`nld_train.inference.model.NLDModel` = the HF Llama/Mistral/Qwen2 names
  (``model.layers.3.self_attn.q_proj.weight``, ``lm_head.weight``).
- **file layouts** of an HF folder: ``hf`` (the plain names: loads in transformers as a standard
  causal LM) and ``nld`` (the public Nemotron-Labs-Diffusion release: ``encoder.*``,
  ``diffusion_head``). A layout is a list of name-prefix renames.

Each row of :data:`MEGATRON_TO_PLAIN` is ``(megatron pattern, plain name(s), transform)``; every
transform has a forward (megatron -> plain) and an inverse (plain -> megatron) in
:data:`TRANSFORMS`. Both megatron layer specs appear: the local one (CPU) and Transformer Engine's,
which fuses the pre-norms into the following linear layer (``layer_norm_weight``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nld_train.errors import CheckpointError, ConfigError, DataError, InputError
from nld_train.inference.model import NLDConfig

NLD_PUBLIC_MODEL_TYPE = "nemotron_labs_diffusion"   # the public release's layout (encoder.*, diffusion_head)
DECODING_BLOCK_SIZE = 32                            # the public config's block_size (all decoders' default)
ADDED_MASK_TOKEN = "<|nld_mask|>"
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp32"}  # fp16 is kept exactly in fp32


# -- families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFFamily:
    """What one HF ``model_type`` brings. The NLD model is Llama-shaped (RMSNorm, SwiGLU, RoPE,
    GQA); a family differs only in the fields below."""
    model_type: str
    label: str                         # as messages name it
    # transformers class names of the standard causal LM; None = read only, never exported as it
    config_class: Optional[str] = None
    model_class: Optional[str] = None
    layout: str = "hf"                 # how its files name the weights (a key of LAYOUTS)
    qkv_bias: bool = False             # q/k/v biases always (Qwen2), never otherwise; none on o_proj
    # config.json's attention_bias also puts a bias on o_proj (Llama), which the NLD model lacks
    attention_bias_on_o_proj: bool = False
    # the flag without which config.json's sliding_window is ignored (Qwen2's use_sliding_window)
    sliding_window_flag: Optional[str] = None
    query_scaling: bool = False        # Llama-4 query scaling (llama_4_scaling_beta) exists here
    # fields the export writes so transformers builds exactly the NLD model (no windows, no biases)
    export_fields: dict = field(default_factory=dict)

    @property
    def exportable(self) -> bool:
        return self.model_class is not None


FAMILIES = {f.model_type: f for f in (
    HFFamily("llama", "Llama", "LlamaConfig", "LlamaForCausalLM", attention_bias_on_o_proj=True,
             export_fields=dict(attention_bias=False, mlp_bias=False)),
    HFFamily("mistral", "Mistral", "MistralConfig", "MistralForCausalLM", export_fields=dict(sliding_window=None)),
    HFFamily("qwen2", "Qwen2", "Qwen2Config", "Qwen2ForCausalLM", qkv_bias=True, sliding_window_flag="use_sliding_window",
             export_fields=dict(use_sliding_window=False, sliding_window=None)),
    HFFamily("ministral3", "Ministral-3", "Ministral3Config", "Ministral3ForCausalLM", query_scaling=True,
             export_fields=dict(sliding_window=None)),
    HFFamily(NLD_PUBLIC_MODEL_TYPE, "Nemotron-Labs-Diffusion", layout="nld"),
)}
EXPORT_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.exportable)


class UnsupportedModelError(ValueError):
    """The HF config describes something the NLD model cannot represent exactly."""


def _refuse(field: str, msg: str):
    raise UnsupportedModelError(f"{field}: {msg}")


def _rope(d: dict):
    """(theta, rope_scaling dict or None, query_scaling_beta) from an HF config dict (v5 or legacy)."""
    rp = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    rp = {**legacy, **rp}
    if "rope_theta" not in rp and "rope_theta" in d:
        rp["rope_theta"] = d["rope_theta"]
    if isinstance(rp.get("rope_theta"), dict) or any(isinstance(v, dict) for v in rp.values()):
        _refuse("rope_parameters", "per-layer-type RoPE parameters are not supported")
    theta = float(rp.get("rope_theta", 10000.0))
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse("rope_parameters.partial_rotary_factor", "partial rotary embeddings are not supported")
    # beta 0 (what --layout nld writes for a model without query scaling: the public attention reads
    # the key for every model) is a scale of exactly 1, i.e. no query scaling
    beta = float(rp.get("llama_4_scaling_beta") or 0.0) or None
    if kind == "default":
        scaling = None
    elif kind == "yarn":
        factor = float(rp["factor"])
        orig = int(rp["original_max_position_embeddings"])
        mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
        att = rp.get("attention_factor")
        if att is None:  # transformers' rule for the cos/sin scale
            def get_mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
                else get_mscale(factor)
        if abs(float(att) - 1.0) > 1e-12:
            _refuse("rope_parameters", f"YaRN with an attention factor of {att:g} (cos/sin scaling) is not "
                    "supported; set mscale == mscale_all_dim (as Ministral-3 does)")
        if rp.get("truncate", True) is False:
            _refuse("rope_parameters.truncate", "YaRN without truncation is not supported")
        scaling = dict(type="yarn", factor=factor, original_max_position_embeddings=orig,
                       beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
                       mscale=float(mscale or 1.0), mscale_all_dim=float(mscale_all or 1.0))
    else:
        _refuse("rope_parameters.rope_type", f"{kind!r} is not supported (only 'default' and 'yarn')")
    if beta and (scaling is None):
        _refuse("rope_parameters.llama_4_scaling_beta", "query scaling needs YaRN's original_max_position_embeddings")
    return theta, scaling, beta


def first_id(x):
    """A token id of config.json, which may be a list (several EOS ids): the first."""
    return x[0] if isinstance(x, (list, tuple)) else x


def nld_config_from_hf(d: dict, mask_token_id: Optional[int] = None) -> NLDConfig:
    """An HF config dict (Llama, Mistral, Qwen2, Ministral-3, the public NLD layout, or our export)
    -> :class:`NLDConfig`; anything the NLD model would not reproduce exactly is refused."""
    mt = d.get("model_type")
    # our exports keep the standard family's model_type (plain transformers loads them) and name
    # the family again in nld_family
    fam = FAMILIES.get(d.get("nld_family", mt))
    if fam is None:
        _refuse("model_type", f"{mt!r} is not supported (supported: {', '.join(FAMILIES)})")
    if d.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", f"{d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if d.get("mlp_bias"):
        _refuse("mlp_bias", "MLP biases are not supported")
    if fam.attention_bias_on_o_proj and d.get("attention_bias"):
        _refuse("attention_bias", f"{fam.label}'s attention_bias also puts a bias on o_proj, which is not supported")
    max_pos = int(d.get("max_position_embeddings", 4096))
    window = d.get("sliding_window")
    if fam.sliding_window_flag and not d.get(fam.sliding_window_flag, False):
        window = None
    if window is not None and int(window) < max_pos:
        _refuse("sliding_window", f"sliding-window attention ({window} < max_position_embeddings={max_pos}) "
                "is not supported")
    layer_types = [t for t in (d.get("layer_types") or []) if t != "full_attention"]
    if layer_types:
        _refuse("layer_types", f"layer types {sorted(set(layer_types))} are not supported (full attention only)")
    theta, scaling, beta = _rope(d)
    heads = int(d["num_attention_heads"])
    mask = mask_token_id if mask_token_id is not None else d.get("mask_token_id")
    if mask is None or int(mask) < 0:
        _refuse("mask_token_id", "the config names no mask token")
    return NLDConfig(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=d.get("head_dim") or None, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, query_scaling_beta=beta, max_position_embeddings=max_pos,
        mask_token_id=int(mask), eos_token_id=first_id(d.get("eos_token_id")),
        block_size=int(d.get("training_block_size", d.get("block_size", 32))), attention_bias=fam.qkv_bias)


def hf_tied(d: dict) -> bool:
    return bool(d.get("tie_word_embeddings", False))


def auto_family(cfg: NLDConfig) -> str:
    """The first standard family (in :data:`FAMILIES` order) whose transformers class computes
    exactly this model; with none, the one whose refusal in :func:`hf_config_dict` says why."""
    fits = [n for n in EXPORT_FAMILIES if FAMILIES[n].qkv_bias == bool(cfg.attention_bias)]
    for name in fits:
        if FAMILIES[name].query_scaling or not cfg.query_scaling_beta:
            return name
    return fits[0] if fits else EXPORT_FAMILIES[0]


def hf_config_dict(cfg: NLDConfig, family: str, extras: Optional[dict] = None, bos_token_id=None,
                   pad_token_id=None) -> dict:
    """:class:`NLDConfig` -> a config.json dict of ``family`` (a standard transformers config, so
    plain transformers loads it) plus the NLD fields (mask token, block sizes) and ``extras``."""
    import transformers
    if family not in EXPORT_FAMILIES:
        _refuse("family", f"{family!r} is not one of {sorted(EXPORT_FAMILIES)}")
    fam = FAMILIES[family]
    with_bias = [n for n in EXPORT_FAMILIES if FAMILIES[n].qkv_bias]
    if cfg.attention_bias != fam.qkv_bias:
        _refuse("family", f"q/k/v biases={cfg.attention_bias}: only the {'/'.join(with_bias)} family "
                f"{'has' if cfg.attention_bias else 'requires'} them")
    if cfg.query_scaling_beta and not fam.query_scaling:
        scaling = [n for n in EXPORT_FAMILIES if FAMILIES[n].query_scaling]
        _refuse("family", f"Llama-4 query scaling exists only in the {'/'.join(scaling)} family")
    rp = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rs = cfg.rope_scaling
        rp = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": rs["factor"],
              "original_max_position_embeddings": rs["original_max_position_embeddings"],
              "beta_fast": rs.get("beta_fast", 32.0), "beta_slow": rs.get("beta_slow", 1.0),
              "mscale": rs.get("mscale", 1.0), "mscale_all_dim": rs.get("mscale_all_dim", 1.0)}
    if cfg.query_scaling_beta:
        rp["llama_4_scaling_beta"] = cfg.query_scaling_beta
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", tie_word_embeddings=False,
              rope_parameters=rp, eos_token_id=cfg.eos_token_id, bos_token_id=bos_token_id,
              pad_token_id=pad_token_id)
    kw.update(fam.export_fields)
    d = getattr(transformers, fam.config_class)(**kw).to_diff_dict()
    d.update(architectures=[fam.model_class], mask_token_id=cfg.mask_token_id, block_size=DECODING_BLOCK_SIZE,
             training_block_size=cfg.block_size, attention_bias=cfg.attention_bias, nld_family=family)
    d.pop("_name_or_path", None)
    d.update(extras or {})
    return d


# -- weight names: megatron <-> plain <-> HF file layouts ----------------------------------------
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
    ("decoder.layers.{i}.self_attention.linear_qkv.bias",
     ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
      "model.layers.{i}.self_attn.v_proj.bias"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
     "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "fc1"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight", "copy"),
)

# HF folder layouts: (plain prefix, file prefix) renames, applied to the start of a name.
LAYOUTS = {
    "hf": (),
    "nld": (("model.", "encoder."), ("lm_head.", "diffusion_head.")),
}


# -- transforms: forward (megatron -> plain parts) and inverse (plain parts -> megatron) -----------
def _qkv_split(t: torch.Tensor, cfg: NLDConfig, **_):
    """Fused QKV rows (weight or bias) per query group: [q x (heads/groups), k, v] per group."""
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // g
    rest = t.shape[1:]
    q, k, v = t.reshape(g, (rep + 2) * hd, *rest).split([rep * hd, hd, hd], 1)
    return q.reshape(g * rep * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest)


def _qkv_merge(parts, cfg: NLDConfig, **_):
    q, k, v = parts
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // g
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, rep * hd, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)], 1)
    return fused.reshape(g * (rep + 2) * hd, *rest)


def _vocab_pad(parts, cfg: NLDConfig, padded_vocab: int, **_):
    """Padded rows (tensor parallelism) are zeros; they never count in a loss or win an argmax."""
    (t,) = parts
    if t.shape[0] != cfg.vocab_size:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, the config says vocab_size={cfg.vocab_size}")
    out = t.new_zeros((padded_vocab,) + tuple(t.shape[1:]))
    out[: cfg.vocab_size] = t
    return out


TRANSFORMS = {
    "copy": (lambda t, cfg, **_: (t,), lambda parts, cfg, **_: parts[0]),
    "vocab_rows": (lambda t, cfg, **_: (t[: cfg.vocab_size],), _vocab_pad),
    "qkv": (_qkv_split, _qkv_merge),
    "fc1": (lambda t, cfg, **_: tuple(t.chunk(2, 0)), lambda parts, cfg, **_: torch.cat(parts, 0)),
}


def _rules():
    out = []
    for src, dst, how in MEGATRON_TO_PLAIN:
        pattern = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$")
        out.append((pattern, (dst,) if isinstance(dst, str) else dst, how))
    return out


def _match(name: str):
    for pattern, dst, how in _rules():
        m = pattern.match(name)
        if m:
            return [d.format(i=m.group(1)) if m.groups() else d for d in dst], how
    raise KeyError(f"no mapping for megatron parameter {name!r}")


def iter_megatron_to_plain(sd: dict, cfg: NLDConfig):
    """A TP=1 megatron state dict -> (plain name, tensor) pairs (padded vocabulary rows dropped).
    The tensors are views of ``sd``'s: copy them where they go, one at a time (no second model)."""
    for name, t in sd.items():
        if name.endswith("_extra_state"):
            continue
        dst, how = _match(name)
        yield from zip(dst, TRANSFORMS[how][0](t.detach(), cfg), strict=True)


def iter_plain_to_megatron(plain: dict, cfg: NLDConfig, megatron_names, padded_vocab: int, consume: bool = False,
                           dtype=None):
    """The plain state dict -> (megatron name, tensor) for the given parameter names (a TP=1
    model's), one at a time. ``consume``: each plain tensor leaves ``plain`` after its last use, so
    a conversion holds the source once and no converted copy of it. ``dtype``: cast per tensor.

    Every plain tensor must be used (an unused one means the config and the weights disagree);
    checked before anything is converted.
    """
    rules = [(name, *_match(name)) for name in megatron_names if not name.endswith("_extra_state")]
    uses: dict = {}
    for name, dst, _ in rules:
        missing = [d for d in dst if d not in plain]
        if missing:
            raise KeyError(f"weights lack {missing} (needed for megatron parameter {name})")
        for d in dst:
            uses[d] = uses.get(d, 0) + 1
    unused = sorted(set(plain) - set(uses))
    if unused:
        raise KeyError(f"weights hold tensors the model has no place for: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}")
    for name, dst, how in rules:
        parts = [plain[d] if dtype is None else plain[d].to(dtype) for d in dst]
        if consume:
            for d in dst:
                uses[d] -= 1
                if not uses[d]:
                    del plain[d]
        yield name, TRANSFORMS[how][1](parts, cfg, padded_vocab=padded_vocab)


def to_layout(name: str, layout: str) -> str:
    """A plain name -> its name in an HF folder of ``layout``."""
    for plain_prefix, file_prefix in LAYOUTS[layout]:
        if name.startswith(plain_prefix):
            return file_prefix + name[len(plain_prefix):]
    return name


def from_layout(name: str, layout: str) -> str:
    """A name in an HF folder of ``layout`` -> the plain name."""
    for plain_prefix, file_prefix in LAYOUTS[layout]:
        if name.startswith(file_prefix):
            return plain_prefix + name[len(file_prefix):]
    return name


# -- reading an HF folder ----------------------------------------------------------------------
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
    """The file layout of an HF folder: its family's, else told by the names (our exports keep the
    standard family's model_type in either layout)."""
    fam = FAMILIES.get(d.get("model_type"))
    if fam is not None and fam.layout != "hf":
        return fam.layout
    for layout, renames in LAYOUTS.items():
        if renames and any(n.startswith(renames[0][1]) for n in names):
            return layout
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
        cfg = nld_config_from_hf(d, mask_token_id=mask)
    except UnsupportedModelError as e:
        raise ConfigError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    if hf_tied(d) or "lm_head.weight" not in sd:
        if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            raise CheckpointError(f"{hf_dir}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
        if not hf_tied(d):
            raise CheckpointError(f"{hf_dir}: lm_head.weight is missing and tie_word_embeddings is false")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()   # untied from here on
    if grow:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            w = sd[k]
            sd[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)], 0)
        cfg.vocab_size += grow
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    info = {"path": str(Path(hf_dir).resolve()), "model_type": d.get("model_type"), "layout": layout,
            "dtype": _DTYPE_NAMES.get(str(dtype), "fp32"), "tied": hf_tied(d),
            "bos_token_id": first_id(d.get("bos_token_id")), "pad_token_id": first_id(d.get("pad_token_id")),
            "added_mask_rows": grow}
    return cfg, sd, tok, info
