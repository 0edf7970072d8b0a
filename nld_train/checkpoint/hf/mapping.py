"""Weight-name mapping between megatron, the plain (HF Llama-named) model and the HF file layouts, as data.

Three name spaces:

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

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # no runtime import: nld_train.inference imports this module
    from nld_train.inference.model import NLDConfig

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
        yield from zip(dst, TRANSFORMS[how][0](t.detach(), cfg))


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
