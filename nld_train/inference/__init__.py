"""Inference: a plain PyTorch decoder with a KV cache and the four NLD decoding modes.

``load_model(path)`` -> :class:`NLDForDecoding` with ``ar_generate``, ``generate`` (block
diffusion), ``linear_spec_generate`` and ``quadratic_spec_generate``, each returning
``(out_ids, nfe)`` (per-call statistics in ``model.last_stats``). See docs/decoding.md.
"""
from nld_train.inference.decoding import DecodeStats, NLDForDecoding
from nld_train.inference.loading import from_megatron, load_model, load_tokenizer
from nld_train.inference.model import KVCache, NLDConfig, NLDModel
from nld_train.inference.policies import CommitPolicy, EvenSplitPolicy, ThresholdPolicy

__all__ = ["load_model", "load_tokenizer", "from_megatron", "NLDForDecoding", "NLDModel", "NLDConfig",
           "KVCache", "DecodeStats", "CommitPolicy", "ThresholdPolicy", "EvenSplitPolicy"]
