"""The ``transformers`` face of the NLD decoder: the remote code of an exported folder.

``nld-convert to-hf`` copies this file, together with the nld_train files it imports
(``hf_format.py``, ``model.py``, ``decoding.py``, ``decoding_modes.py``, ``masks.py``, ``rope.py``,
``errors.py``, ...; imports rewritten to relative ones) into the export folder, flat: no two may share
a file name. ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` then gives
:class:`NLDHFForCausalLM`, whose ``ar_generate`` / ``generate`` / ``linear_spec_generate`` /
``quadratic_spec_generate`` (every registered decoding mode's method, and ``decode(mode, ...)``) are
nld-train's own decoding code (one source of truth), and whose ``forward`` returns causal-LM logits.
Without remote code the same folder loads as a standard
Llama / Mistral / Qwen2 / Ministral-3 causal LM (AR mode).

Depends only on torch, transformers and the files above (the HF families and config.json <->
:class:`NLDConfig` live in :mod:`.hf_format`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nld_train.decoding_modes import decode, method_names
from nld_train.inference.decoding import NLDForDecoding
from nld_train.inference.hf_format import DECODING_BLOCK_SIZE, nld_config_from_hf
from nld_train.inference.masks import causal_mask
from nld_train.inference.model import NLDConfig, RMSNorm
from nld_train.model.rope import rope_inv_freq


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
            d.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_params()).to(dev)
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
