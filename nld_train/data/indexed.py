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
import json
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

from nld_train.data.tokenizer import MegatronTokenizer, vocab_sha256
from nld_train.errors import DataError

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
            warnings.warn(f"could not lock {path} ({err}); concurrent builders may collide", stacklevel=2)
        yield  # closing the file releases the lock


def token_dtype(vocab_size: int) -> type[np.number]:
    # The same rule as GPTDatasetConfig.token_dtype_code: ids < 65536 fit uint16, halving the .bin.
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class IndexedWriter:
    """Megatron's `IndexedDatasetBuilder` writing `<prefix>.bin/.idx` under temporary names in the
    target folder; `commit()` renames them into place, the .idx last, after removing any old .idx.
    A reader therefore sees the old dataset, no .idx (incomplete), or the new complete pair, never a
    half-written pair that looks complete. Leaving the block without `commit()` removes the temporaries.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]):
        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tmp = f"{self.prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=dtype)
        self.documents = self.tokens = 0

    def add_documents(self, flat: np.ndarray, lengths: Sequence[int]) -> None:
        """Several documents (one megatron sequence each): their concatenation and their lengths.

        The same bytes and index entries as one `builder.add_document` per document, in one write.
        """
        lengths = [int(n) for n in lengths]
        flat = np.ascontiguousarray(flat, dtype=self.builder.dtype)
        if flat.ndim != 1 or sum(lengths) != flat.size or any(n <= 0 for n in lengths):
            raise DataError(f"{self.prefix}: {flat.size} tokens do not split into the positive lengths given")
        self.builder.data_file.write(flat.tobytes(order="C"))
        seq = self.builder.sequence_lengths
        seq.extend(lengths)
        self.builder.document_indices.extend(range(len(seq) - len(lengths) + 1, len(seq) + 1))
        self.documents += len(lengths)
        self.tokens += flat.size

    def commit(self) -> None:
        if self.documents == 0:
            raise DataError(f"no documents to write to {self.prefix}")
        self.builder.finalize(self.tmp + ".idx")
        for suffix in (".bin", ".idx"):
            _fsync(self.tmp + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.builder.data_file.close()  # already closed by finalize() unless we are failing
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp + suffix)


def write_indexed_dataset(
    prefix: str | os.PathLike, documents: Iterable[Sequence[int]], vocab_size: int
) -> tuple[int, int]:
    """Write `<prefix>.bin/.idx` atomically (`IndexedWriter`), one megatron document (and sequence) per
    item; return (documents, tokens)."""
    with IndexedWriter(prefix, token_dtype(vocab_size)) as writer:
        for doc in documents:
            ids = np.asarray(doc, dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise DataError(f"document {writer.documents} is empty or not a flat list of token ids")
            if ids.min() < 0 or ids.max() >= vocab_size:  # would wrap silently in uint16
                raise DataError(
                    f"document {writer.documents} has token ids outside [0, {vocab_size}): "
                    f"min {ids.min()}, max {ids.max()}"
                )
            writer.add_documents(ids, [ids.size])
        writer.commit()
    return writer.documents, writer.tokens


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


# ------------------------------------------------------------------------ sidecars (nld-prepare-data)
# `<prefix>.json` next to a shard describes it (tokenizer identity, counts, loss mask); a manifest
# `<output>.json` lists the shards of one `nld-prepare-data` output, so `data.path=<output>` works
# whatever the number of shards. `<shard>.lossmask.bin/.idx` holds one uint8 per token (SFT).
SIDECAR_FORMAT = "nld-prepare-data/1"
LOSS_MASK_SUFFIX = ".lossmask"


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_sidecar(prefix: str | os.PathLike) -> dict | None:
    """The JSON sidecar `<prefix>.json` written by nld-prepare-data, or None when there is none."""
    path = str(prefix) + ".json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"sidecar {path} is unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{path} is not an nld-prepare-data sidecar (format {SIDECAR_FORMAT!r})")
    return meta


def manifest_shards(prefix: str, meta: dict) -> list[tuple[str, int]]:
    """(shard prefix, tokens) of a complete manifest; shard names are relative to its folder."""
    if meta.get("kind") != "manifest":
        raise DataError(f"{prefix}.json describes a single shard, not a manifest")
    if meta.get("status") != "complete":
        raise DataError(f"{prefix}: nld-prepare-data did not finish (status {meta.get('status')!r}); "
                        "run it again with the same arguments to complete it")
    folder = os.path.dirname(prefix)
    return [(os.path.join(folder, shard["name"]), int(shard["tokens"])) for shard in meta["shards"]]


def resolve_data_path(path) -> tuple[list[str], list[float] | None]:
    """`parse_data_path`, with every nld-prepare-data output prefix (a manifest, no .idx of its own)
    replaced by its shards. In a weighted blend a manifest's weight is split over its shards in
    proportion to their tokens; without weights megatron weighs every shard by its size."""
    prefixes, weights = parse_data_path(path)
    out_prefixes, out_weights = [], []
    for i, prefix in enumerate(prefixes):
        meta = None if os.path.isfile(prefix + ".idx") else read_sidecar(prefix)
        if meta is None:
            out_prefixes.append(prefix)
            out_weights.append(None if weights is None else weights[i])
            continue
        shards = manifest_shards(prefix, meta)
        total = sum(tokens for _, tokens in shards)
        for shard, tokens in shards:
            out_prefixes.append(shard)
            out_weights.append(None if weights is None else weights[i] * tokens / total)
    return out_prefixes, (None if weights is None else out_weights)


def validate_loss_mask(prefix: str) -> int:
    """Check `<prefix>.lossmask.bin/.idx` against the token shard; return the number of loss tokens."""
    mask_prefix = prefix + LOSS_MASK_SUFFIX
    if not os.path.isfile(mask_prefix + ".idx"):
        raise DataError(f"{prefix} has no loss mask ({mask_prefix}.bin/.idx): SFT data must come from "
                        "nld-prepare-data on chat input (a messages field)")
    validate_indexed_prefix(mask_prefix)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(mask_prefix)
    same = np.array_equal(tokens.sequence_lengths, mask.sequence_lengths) and np.array_equal(
        tokens.document_indices, mask.document_indices)
    if not same:
        raise DataError(f"loss mask {mask_prefix} does not match the documents of {prefix}")
    if mask.index.dtype != np.uint8:
        raise DataError(f"loss mask {mask_prefix} must hold uint8 values, holds {mask.index.dtype}")
    del tokens, mask
    return int(np.count_nonzero(np.memmap(mask_prefix + ".bin", dtype=np.uint8, mode="r")))


def check_data(path, tokenizer, data_format: str) -> list[dict]:
    """Everything about `data.path` that can be refused before a model is built: every prefix exists
    and is intact; shards with a sidecar were made with the same vocabulary as `tokenizer`; SFT data
    has loss masks and pretraining data has none. Returns one summary per shard."""
    if data_format not in ("gpt", "sft"):
        raise DataError(f"data.format must be 'gpt' or 'sft', got {data_format!r}")
    model_hash = None
    out = []
    for prefix in resolve_data_path(path)[0]:
        info = validate_indexed_prefix(prefix)
        meta = read_sidecar(prefix)
        if meta is not None:
            recorded = meta.get("tokenizer", {})
            model_hash = model_hash or vocab_sha256(tokenizer)
            if recorded.get("vocab_sha256") != model_hash:
                raise DataError(
                    f"{prefix} was tokenized with {recorded.get('name_or_path')!r} (vocab sha256 "
                    f"{str(recorded.get('vocab_sha256'))[:12]}, {recorded.get('vocab_size')} tokens) but the "
                    f"model's tokenizer {tokenizer.name_or_path!r} has vocab sha256 {model_hash[:12]} "
                    f"({len(tokenizer)} tokens): prepare the data with the model's tokenizer")
        has_mask = os.path.isfile(prefix + LOSS_MASK_SUFFIX + ".idx")
        if data_format == "gpt" and has_mask:
            raise DataError(f"{prefix} holds chat data with a loss mask: train it with data.format=sft "
                            "(pretraining would ignore the mask and train on the prompts)")
        loss_tokens = validate_loss_mask(prefix) if data_format == "sft" else info.tokens
        out.append({"prefix": prefix, "documents": info.documents, "tokens": info.tokens,
                    "loss_tokens": loss_tokens})
    return out


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
    for weight, prefix in zip(weights, items[1::2], strict=True):
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(f"blend weight {weight} for {prefix!r} must be a positive number")
    return items[1::2], weights


def _check_splits(prefix: str, n_sequences: int, split: str, sizes: list[int]) -> None:
    """Megatron loops forever on a split that gets no documents (it adds 0-token epochs until it has
    enough tokens), so refuse those here, with the same rounding it uses to cut the splits."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds, size in zip(("train", "valid", "test"), matrix, sizes, strict=True):
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
    prefixes, weights = resolve_data_path(path)
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
