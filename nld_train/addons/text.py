"""Token windows from ``data.path`` for add-on data generation and measurements.

The documents of the indexed shards are split by position: the first ``1 - holdout_fraction`` of
them feed data generation, the rest are held out for measurements (``holdout=True``), so the
measured prompts are text the add-ons never saw.
"""
from __future__ import annotations

import numpy as np
import torch

from nld_train.data import parse_data_path, validate_indexed_prefix
from nld_train.errors import DataError


def token_windows(data_path, n: int, length: int, seed: int, holdout_fraction: float, holdout: bool,
                  vocab_size: int | None = None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens ``[n, length]`` at seeded random offsets of the chosen documents.
    With ``vocab_size`` (the base model's), data tokenised for another vocabulary is refused."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, _ = parse_data_path(data_path)
    docs = []
    for prefix in prefixes:
        validate_indexed_prefix(prefix)
        ds = IndexedDataset(prefix)
        n_docs = len(ds)
        cut = int(round(n_docs * (1 - holdout_fraction)))
        if not 0 < cut < n_docs:
            raise DataError(f"{prefix}: {n_docs} documents cannot be split {1 - holdout_fraction:.2f}/"
                            f"{holdout_fraction:.2f} (addon.holdout_fraction)")
        docs += [ds[i] for i in (range(cut, n_docs) if holdout else range(cut))]
    docs = [d for d in docs if len(d) >= length]
    if not docs:
        raise DataError(f"no document of {data_path} holds {length} tokens")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(d) - length + 1 for d in docs], dtype=np.float64)
    which = rng.choice(len(docs), size=n, p=sizes / sizes.sum())
    out = np.stack([docs[w][(o := rng.integers(0, len(docs[w]) - length + 1)): o + length] for w in which])
    if vocab_size is not None and out.size and int(out.max()) >= vocab_size:
        raise DataError(f"{data_path}: token id {int(out.max())} is outside the base model's vocabulary "
                        f"({vocab_size} ids): the add-on must read data tokenised for its base model "
                        f"(set data.path, or the data group the base model was trained on, e.g. data=demo_math)")
    return torch.from_numpy(out.astype(np.int64))
