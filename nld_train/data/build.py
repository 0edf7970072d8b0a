"""The train/valid datasets of a run, from `data.*`: megatron GPTDatasets (pretraining) or packed SFT rows."""

from __future__ import annotations

from nld_train.data.indexed import build_gpt_datasets, resolve_data_path
from nld_train.data.sft import build_sft_datasets
from nld_train.errors import DataError


def build_datasets(data, tokenizer, seq_length: int, num_train_samples: int, num_valid_samples: int, seed: int,
                   cache_dir: str, align: int):
    """(train, valid or None). `data` is the DataConfig, `tokenizer` a MegatronTokenizer; `align` is
    where packed conversations may start (the diffusion block size for the joint objective)."""
    if data.format == "sft":
        prefixes, weights = resolve_data_path(data.path)
        if weights is not None:
            raise DataError("data.format=sft takes prefixes without blend weights (every conversation is used "
                            "once per epoch); list the prefixes, or repeat one to weigh it more")
        return build_sft_datasets(prefixes, seq_length, num_train_samples, num_valid_samples, seed, data.split,
                                  tokenizer.pad, align, data.pack)
    return build_gpt_datasets(data.path, tokenizer, seq_length, num_train_samples, num_valid_samples, seed,
                              data.split, cache_dir)


def describe(summary: list[dict], data_format: str, run_tokens: int) -> str:
    """One log line: what `data.path` holds and how much of it the run reads."""
    docs = sum(s["documents"] for s in summary)
    tokens = sum(s["tokens"] for s in summary)
    what = "conversations" if data_format == "sft" else "documents"
    extra = f", {sum(s['loss_tokens'] for s in summary):,} answer tokens" if data_format == "sft" else ""
    return (f"data: {len(summary)} prefix(es), {docs:,} {what}, {tokens:,} tokens{extra}; the run reads "
            f"{run_tokens:,} tokens ({run_tokens / max(tokens, 1):.2f}x the data, before the train/valid split)")
