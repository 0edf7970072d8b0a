"""The ``transformers`` face of the NLD decoder: HF config <-> :class:`NLDConfig`, and the remote code.

``nld-convert to-hf`` copies this file, together with the inference files it imports
(``model.py``, ``decoding.py``, ``masks.py``, ``rope.py``, ``decoding_modes.py``; imports rewritten to
relative ones), into the export folder. ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` then gives :class:`NLDHFForCausalLM`, whose ``ar_generate`` / ``generate`` /
``linear_spec_generate`` / ``quadratic_spec_generate`` (every registered decoding mode's method, and
``decode(mode, ...)``) are nld-train's own decoding code (one source of truth), and whose ``forward``
returns causal-LM logits. Without remote code the same folder loads as a standard
Llama / Mistral / Qwen2 / Ministral-3 causal LM (AR mode).

Depends only on torch, transformers and the inference files above. Refusals raise
:class:`UnsupportedModelError` (a ValueError) naming the config field.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nld_train.decoding_modes import decode, method_names
from nld_train.inference.decoding import NLDForDecoding
from nld_train.inference.masks import causal_mask
from nld_train.inference.model import NLDConfig, RMSNorm
from nld_train.model.rope import rope_inv_freq

# HF model_type -> (config class name, causal-LM class name) for plain-transformers loading
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM"),
}
NLD_PUBLIC_MODEL_TYPE = "nemotron_labs_diffusion"   # the public release's layout (encoder.*, diffusion_head)
DECODING_BLOCK_SIZE = 32                            # the public config's block_size (all decoders' default)


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
    beta = rp.get("llama_4_scaling_beta")
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
    return theta, scaling, (float(beta) if beta else None)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def nld_config_from_hf(d: dict, mask_token_id: Optional[int] = None) -> NLDConfig:
    """An HF config dict (Llama, Mistral, Qwen2, Ministral-3, the public NLD layout, or our export)
    -> :class:`NLDConfig`; anything the NLD model would not reproduce exactly is refused."""
    mt = d.get("model_type")
    family = d.get("nld_family", mt)
    if family not in (*FAMILIES, NLD_PUBLIC_MODEL_TYPE):
        _refuse("model_type", f"{mt!r} is not supported (supported: {', '.join([*FAMILIES, NLD_PUBLIC_MODEL_TYPE])})")
    if d.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", f"{d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if d.get("mlp_bias"):
        _refuse("mlp_bias", "MLP biases are not supported")
    if family == "llama" and d.get("attention_bias"):
        _refuse("attention_bias", "Llama's attention_bias also puts a bias on o_proj, which is not supported")
    qkv_bias = family == "qwen2"      # Qwen2 always has q/k/v biases (and none on o_proj)
    max_pos = int(d.get("max_position_embeddings", 4096))
    window = d.get("sliding_window")
    if family == "qwen2" and not d.get("use_sliding_window", False):
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
        mask_token_id=int(mask), eos_token_id=_first(d.get("eos_token_id")),
        block_size=int(d.get("training_block_size", d.get("block_size", 32))), attention_bias=qkv_bias)


def hf_tied(d: dict) -> bool:
    return bool(d.get("tie_word_embeddings", False))


def auto_family(cfg: NLDConfig) -> str:
    """The standard family whose transformers class computes exactly this model."""
    if cfg.attention_bias:
        return "qwen2"
    if cfg.query_scaling_beta:
        return "ministral3"
    return "llama"


def hf_config_dict(cfg: NLDConfig, family: str, extras: Optional[dict] = None, bos_token_id=None,
                   pad_token_id=None) -> dict:
    """:class:`NLDConfig` -> a config.json dict of ``family`` (a standard transformers config, so
    plain transformers loads it) plus the NLD fields (mask token, block sizes) and ``extras``."""
    import transformers
    if family not in FAMILIES:
        _refuse("family", f"{family!r} is not one of {sorted(FAMILIES)}")
    if cfg.attention_bias != (family == "qwen2"):
        _refuse("family", f"q/k/v biases={cfg.attention_bias}: only the qwen2 family "
                f"{'has' if cfg.attention_bias else 'requires'} them")
    if cfg.query_scaling_beta and family != "ministral3":
        _refuse("family", "Llama-4 query scaling exists only in the ministral3 family")
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
    if family in ("mistral", "ministral3"):
        kw["sliding_window"] = None
    if family == "qwen2":
        kw.update(use_sliding_window=False, sliding_window=None)
    if family == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    conf_cls_name, model_cls_name = FAMILIES[family]
    d = getattr(transformers, conf_cls_name)(**kw).to_diff_dict()
    d.update(architectures=[model_cls_name], mask_token_id=cfg.mask_token_id, block_size=DECODING_BLOCK_SIZE,
             training_block_size=cfg.block_size, attention_bias=cfg.attention_bias, nld_family=family)
    d.pop("_name_or_path", None)
    d.update(extras or {})
    return d


# -- remote code ------------------------------------------------------------------------------------
class NLDHFConfig(PretrainedConfig):
    """Holds the exported config.json as is; :meth:`nld_config` is the decoder's view of it."""
    model_type = "nld_train"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # config.json keeps the family's model_type (for plain transformers); read it without the
        # "model of type llama used for nld_train" mismatch warning of the base implementation
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict.setdefault("nld_family", config_dict.get("model_type"))
        return cls.from_dict(config_dict, **kwargs)

    def nld_config(self) -> NLDConfig:
        return nld_config_from_hf(self.to_dict())


class NLDHFForCausalLM(PreTrainedModel):
    """nld-train's decoder as an HF model: causal-LM ``forward`` and the four decoding methods.

    The weights are the decoder's own modules registered under the HF names (``model.*``,
    ``lm_head``); the decoder object itself is kept outside the module tree so its parameters are
    not listed twice.
    """
    config_class = NLDHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    def __init__(self, config: NLDHFConfig):
        super().__init__(config)
        decoder = NLDForDecoding(config.nld_config())
        self.model, self.lm_head = decoder.model, decoder.lm_head
        self.__dict__["_nld"] = decoder
        self.post_init()

    def _init_weights(self, module):
        from transformers import initialization as init
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    def decoder(self) -> NLDForDecoding:
        """The plain decoder sharing this model's weights (RoPE frequencies on the weights' device)."""
        d = self._nld
        dev = self.lm_head.weight.device
        if d.inv_freq.is_meta or d.inv_freq.device != dev:
            c = d.config
            d.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c._scaling()).to(dev)
        d.train(self.training)
        return d

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **unused) -> CausalLMOutputWithPast:
        """Causal-LM logits ``[b, s, vocab]`` (left padding via ``attention_mask``); loss with ``labels``."""
        d = self.decoder()
        b, s = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = causal_mask(valid.new_zeros(b, 0), s, valid)
        logits = d(input_ids, position_ids, mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- the decoding modes (nld_train/decoding_modes.py), each -> (out_ids, nfe) -------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, block_length=DECODING_BLOCK_SIZE, threshold=0.9, **kw):
        # explicit: it must replace transformers' GenerationMixin.generate (block diffusion here)
        return self.decoder().generate(input_ids, max_new_tokens, block_length=block_length, threshold=threshold, **kw)

    @torch.no_grad()
    def decode(self, mode: str, input_ids, max_new_tokens, **kw):
        """Any registered mode by name, with the shared settings (block_length, threshold,
        draft_threshold) of :func:`decoding_modes.decode`."""
        return decode(self.decoder(), mode, input_ids, max_new_tokens, **kw)

    def __getattr__(self, name):
        # the other modes' methods (ar_generate, linear_spec_generate, ...) are the decoder's own,
        # looked up when called so that a mode registered later is there too
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in method_names() and hasattr(self.__dict__.get("_nld"), name):
                return getattr(self.decoder(), name)
            raise

    @property
    def last_stats(self):
        """Statistics of the last decoding call (:class:`DecodeStats`)."""
        return self._nld.last_stats
