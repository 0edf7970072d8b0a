"""Megatron indexed datasets: writing and checking `.bin/.idx` shards, blends, GPTDataset splits.

The trainer addresses samples by global index (`step * global_batch + offset`, see `get_samples`), so
what a step sees depends only on the data, the seed and the sample count, never on the number of
ranks or on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, _IndexReader

from nld_train.errors import DataError
from nld_train.data.tokenizer import MegatronTokenizer

# .idx layout (megatron's _IndexWriter): 9-byte magic, u64 version, u8 dtype code, u64 sequence
# count, u64 document count, then int32 lengths, int64 byte pointers, int64 document boundaries.
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock held for the duration of the block (released if the process dies)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # some network filesystems refuse locks: build unlocked, loudly
            warnings.warn(f"could not lock {path} ({err}); concurrent builders may collide")
        yield  # closing the file releases the lock


def token_dtype(vocab_size: int) -> type[np.number]:
    # The same rule as GPTDatasetConfig.token_dtype_code: ids < 65536 fit uint16, halving the .bin.
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_indexed_dataset(
    prefix: str | os.PathLike, documents: Iterable[Sequence[int]], vocab_size: int
) -> tuple[int, int]:
    """Write `<prefix>.bin/.idx`, one megatron document (and sequence) per item; return (documents, tokens).

    Atomic: both files are written under temporary names in the target folder and renamed into place,
    the .idx last, after removing any old .idx. A reader therefore sees the old dataset, no .idx
    (incomplete), or the new complete pair, never a half-written pair that looks complete.
    """
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = token_dtype(vocab_size)
    n_docs = n_tokens = 0
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for doc in documents:
            ids = np.asarray(doc, dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise DataError(f"document {n_docs} is empty or not a flat list of token ids")
            if ids.min() < 0 or ids.max() >= vocab_size:  # would wrap silently in uint16
                raise DataError(
                    f"document {n_docs} has token ids outside [0, {vocab_size}): min {ids.min()}, max {ids.max()}"
                )
            builder.add_document(ids, [ids.size])
            n_docs += 1
            n_tokens += ids.size
        builder.finalize(tmp + ".idx")
        if n_docs == 0:
            raise DataError(f"no documents to write to {prefix}")
        for suffix in (".bin", ".idx"):
            _fsync(tmp + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        builder.data_file.close()  # already closed by finalize() unless we are failing
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp + suffix)
    return n_docs, n_tokens


class IndexedInfo(NamedTuple):
    documents: int
    sequences: int  # megatron splits train/valid/test by sequence; ours are one per document
    tokens: int


def validate_indexed_prefix(prefix: str | os.PathLike) -> IndexedInfo:
    """Check that `<prefix>.bin/.idx` exist and agree before megatron uses them.

    Megatron trusts both files: a truncated .bin surfaces as a numpy error deep in a data worker, or
    not at all. Read-only: the files are never modified or removed.
    """
    prefix = str(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"

    def corrupt(path: str, what: str) -> DataError:
        return DataError(f"data file {path} is corrupt or incomplete: {what}")

    missing = [path for path in (bin_path, idx_path) if not os.path.isfile(path)]
    if len(missing) == 2:
        raise DataError(f"data prefix {prefix!r} not found: neither {bin_path} nor {idx_path} exists")
    if missing:
        raise corrupt(missing[0], "the file is missing (its partner exists)")

    # Parse the index ourselves first (megatron reports damage with bare asserts), then check sizes.
    idx_size = os.path.getsize(idx_path)
    if idx_size < _IDX_HEADER_BYTES:
        raise corrupt(idx_path, f"{idx_size} bytes, shorter than the {_IDX_HEADER_BYTES}-byte header")
    try:
        index = _IndexReader(idx_path, multimodal=False)
    except Exception as err:  # AssertionError for a bad magic/version, ValueError for short arrays
        raise corrupt(idx_path, f"the index does not parse ({type(err).__name__}: {err})") from None
    n_seq, n_doc_bounds = index.sequence_count, index.document_count
    expected_idx = _IDX_HEADER_BYTES + n_seq * (4 + 8) + n_doc_bounds * 8
    if idx_size != expected_idx:
        raise corrupt(idx_path, f"{idx_size} bytes, the header implies {expected_idx}")
    lengths, bounds = index.sequence_lengths, index.document_indices
    if n_seq == 0 or n_doc_bounds < 2 or bounds[0] != 0 or bounds[-1] != n_seq or np.any(np.diff(bounds) < 0):
        raise corrupt(idx_path, "inconsistent document boundaries")
    if lengths.min() < 0:
        raise corrupt(idx_path, "negative sequence lengths")
    n_tokens = int(lengths.sum(dtype=np.int64))
    itemsize = np.dtype(index.dtype).itemsize
    del lengths, bounds, index  # views first: megatron closes the memory map in __del__

    expected_bin = n_tokens * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        what = f"{bin_size} bytes, the index describes {n_tokens} tokens x {itemsize} bytes = {expected_bin}"
        raise corrupt(bin_path, what)
    try:  # megatron's own consistency asserts, opened as GPTDataset will (and closed at once)
        IndexedDataset(prefix)
    except Exception as err:
        raise corrupt(idx_path, f"megatron cannot open it ({type(err).__name__}: {err})") from None
    return IndexedInfo(documents=n_doc_bounds - 1, sequences=n_seq, tokens=n_tokens)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(path: str | os.PathLike | Sequence) -> tuple[list[str], list[float] | None]:
    """`data.path` -> (prefixes, weights or None).

    Accepts one prefix, megatron's blend list `[w1, prefix1, w2, prefix2, ...]`, the same as one
    whitespace-separated string, or a list of prefixes without weights (weighted by their size).
    """
    if isinstance(path, (str, os.PathLike)):
        items = str(path).split()
    elif isinstance(path, Iterable) and not isinstance(path, Mapping):  # list, tuple, OmegaConf ListConfig
        items = [str(item).strip() for item in path]
    else:
        raise DataError(f"data.path must be a prefix string or a blend list, got {type(path).__name__}")
    if not items or any(not item for item in items):
        raise DataError(f"data.path is empty or has empty entries: {path!r}")

    numeric = [_is_number(item) for item in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise DataError(f"a data.path blend alternates weight and prefix, [w1, prefix1, w2, prefix2, ...]: {path!r}")
    weights = [float(w) for w in items[0::2]]
    for weight, prefix in zip(weights, items[1::2]):
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(f"blend weight {weight} for {prefix!r} must be a positive number")
    return items[1::2], weights


def _check_splits(prefix: str, n_sequences: int, split: str, sizes: list[int]) -> None:
    """Megatron loops forever on a split that gets no documents (it adds 0-token epochs until it has
    enough tokens), so refuse those here, with the same rounding it uses to cut the splits."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds, size in zip(("train", "valid", "test"), matrix, sizes):
        if bounds is None:
            if size > 0:
                raise DataError(f"split {split!r} gives no {name} data but {size} {name} samples were requested")
            continue
        if int(round(bounds[1] * n_sequences)) == int(round(bounds[0] * n_sequences)):
            raise DataError(
                f"split {split!r} gives no {name} documents of {prefix} ({n_sequences} sequences in all): "
                f"use a larger fraction, more documents, or 0 for that split (e.g. '100,0,0' without validation)"
            )


def _cache_subdir(prefixes: list[str]) -> str:
    """Megatron keys its cached indices by prefix *path*, not content: a prefix regenerated from other
    text would silently reuse indices built for the old sequence lengths. Fold a fingerprint of each
    .idx (the lengths are all the indices depend on) into the folder name. Content, not mtime, so that
    node-local copies agree across ranks; head and tail only, so a multi-GB index costs nothing."""
    chunk = 16 << 20
    digest = hashlib.sha256()
    for prefix in prefixes:
        size = os.path.getsize(prefix + ".idx")
        digest.update(f"{size}:{os.path.getsize(prefix + '.bin')};".encode())
        with open(prefix + ".idx", "rb") as handle:
            digest.update(handle.read(chunk))
            if size > 2 * chunk:
                handle.seek(size - chunk)
            digest.update(handle.read())
    return "gpt_indices_" + digest.hexdigest()[:16]


@contextlib.contextmanager
def _rank_zero_without_dist() -> Iterator[None]:
    """BlendedDataset calls torch.distributed.get_rank() on a cache miss even when torch.distributed
    is not initialised (GPTDataset checks is_initialized() first), which raises in a plain process.
    A single process is rank 0, so say so for the duration of the build."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0):
        yield


def build_gpt_datasets(
    path: str | Sequence,
    tokenizer: MegatronTokenizer,
    seq_length: int,
    num_train_samples: int,
    num_valid_samples: int,
    seed: int,
    split: str,
    cache_dir: str | os.PathLike,
):
    """(train, valid) GPTDatasets (or BlendedDatasets for a weighted blend) for `data.path`.

    `split` is megatron's "train,valid,test" weighting of each prefix's documents, e.g. "95,5,0".
    `valid` is None when `num_valid_samples == 0`. Call it on every
    rank: under torch.distributed, rank 0 builds the index cache, the others wait at a barrier and load
    it (so `cache_dir` must be on a filesystem all nodes share); without it the process builds alone.
    """
    if seq_length <= 0 or num_train_samples <= 0 or num_valid_samples < 0:
        raise DataError(
            f"need seq_length > 0, num_train_samples > 0, num_valid_samples >= 0; got "
            f"{seq_length}, {num_train_samples}, {num_valid_samples}"
        )
    prefixes, weights = parse_data_path(path)
    sizes = [int(num_train_samples), int(num_valid_samples), 0]
    for prefix in prefixes:
        _check_splits(prefix, validate_indexed_prefix(prefix).sequences, split, sizes)
    if len(prefixes) == 1:
        weights = None  # a one-dataset "blend" only adds a BlendedDataset layer (and a warning)

    cache = os.path.join(str(cache_dir), _cache_subdir(prefixes))
    options = dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its own (joint) mask
        path_to_cache=cache,
        mid_level_dataset_surplus=0.005,  # headroom so a weighted blend never oversamples a source
    )
    known = {field.name for field in dataclasses.fields(GPTDatasetConfig)}
    config = GPTDatasetConfig(**{k: v for k, v in options.items() if k in known})
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)

    # Megatron writes its .npy caches non-atomically; the lock keeps independent processes (parallel
    # jobs or tests sharing cache_dir) from loading a half-written file. Under torch.distributed only
    # rank 0 writes and the others wait for it at megatron's barrier, so only rank 0 locks.
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    writer = not dist_on or torch.distributed.get_rank() == 0
    lock = file_lock(os.path.join(cache, ".build.lock")) if writer else contextlib.nullcontext()
    with lock, _rank_zero_without_dist():
        train, valid, _test = builder.build()
    return train, (valid if num_valid_samples > 0 else None)


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts into a batch; `loss_mask` as float (GPTDataset already gives float)."""
    if not samples:
        raise DataError("collate needs at least one sample")
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def get_samples(dataset, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """Fetch samples by global index and collate them.

    GPTDataset's shuffle is fixed by the seed, so index i names the same sample on any rank count
    and after any resume: the trainer asks for `step * global_batch + offset`.
    """
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise IndexError(
            f"sample indices {bad[:4]} outside the dataset's {len(dataset)} samples; "
            "build it with at least max_steps * global_batch_size train samples"
        )
    return collate([dataset[i] for i in indices])
