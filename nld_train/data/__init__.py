"""Data layer: tokenizers, megatron indexed datasets, preparation (nld-prepare-data), SFT rows, the demo corpus.

Names are resolved on first use so that `nld_train.data.tokenizer` stays importable (and quick)
without megatron, which only `indexed` and `demo_corpus` need.
"""

import importlib

_EXPORTS = {
    "DEMO_TOKENIZER": "tokenizer",
    "MegatronTokenizer": "tokenizer",
    "check_mask_token": "tokenizer",
    "load_tokenizer": "tokenizer",
    "IndexedInfo": "indexed",
    "build_gpt_datasets": "indexed",
    "collate": "indexed",
    "get_samples": "indexed",
    "parse_data_path": "indexed",
    "validate_indexed_prefix": "indexed",
    "write_indexed_dataset": "indexed",
    "ensure_demo_corpus": "demo_corpus",
    "check_data": "indexed",
    "resolve_data_path": "indexed",
    "build_datasets": "build",
    "describe": "build",
    "SFTDataset": "sft",
    "ChatFormatter": "sft",
    "DEFAULT_CHAT_TEMPLATE": "sft",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__
