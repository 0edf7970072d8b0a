"""Tokenizer loading and the small adapter megatron's GPTDataset needs.

Depends only on the standard library and transformers (never megatron): `load_tokenizer` is
re-exported by `nld_train.inference`, whose files must also work as the remote code of an HF export.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nld_train.errors import DataError

if TYPE_CHECKING:  # importing transformers takes a second or more; only the functions below need it
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The packaged 8k byte-level BPE trained on Shakespeare (scripts/train_demo_tokenizer.py):
# <|endoftext|> = 0 (eos, bos, eod), <|mask|> = 1, <|pad|> = 2.
DEMO_TOKENIZER = str(Path(__file__).resolve().parent.parent / "assets" / "demo_tokenizer")

# A folder holding either file is something AutoTokenizer can load without the hub.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerFast":
    """Load an HF tokenizer from a local folder (never from the hub).

    Checks the folder first so that a typo gives "no such folder" rather than transformers trying
    to resolve the string as a hub repository name.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(
            f"{str(path)!r} is not a tokenizer folder: it has neither {' nor '.join(_TOKENIZER_FILES)}"
        )
    from transformers import AutoTokenizer

    try:
        # never run (nor ask about) a folder's remote code: a tokenizer needs none, and an export in
        # the public NLD layout names remote-code files in its config.json that it does not ship;
        # left unset, transformers would prompt on stdin (waiting ~15 s when nobody answers)
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError depending on the damage
        raise DataError(f"cannot load the tokenizer in {str(path)!r}: {err}") from err


def check_mask_token(tokenizer: "PreTrainedTokenizerBase", mask_token_id: int) -> None:
    """Fail early when the model's mask id is not the tokenizer's mask token.

    Diffusion training replaces tokens with `mask_token_id`; if that id means something else to the
    tokenizer, training still runs but the exported model cannot be prompted consistently.
    """
    actual = getattr(tokenizer, "mask_token_id", None)
    if actual is None:
        raise DataError(
            f"the tokenizer has no mask token but the model config sets mask_token_id={mask_token_id}; "
            "add one (tokenizer.add_special_tokens({'mask_token': ...})) or use a tokenizer that has it"
        )
    if actual != mask_token_id:
        raise DataError(
            f"mask token mismatch: the tokenizer's mask token id is {actual}, "
            f"the model config's mask_token_id is {mask_token_id}"
        )


def tokenizer_sha256(tokenizer: "PreTrainedTokenizerBase") -> str | None:
    """Content hash of a tokenizer: its tokenizer.json, as held in memory when it is a fast one.

    The in-memory serialisation also covers tokens added after loading and tokenizers that never had
    a folder (`name_or_path` is then "" and a file lookup would hash whatever is in the cwd).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # transformers switches padding/truncation on the backend per call; that is call state, not
        # identity, and every rank must compute the same hash or they look for different cache files.
        state.pop("padding", None)
        state.pop("truncation", None)
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    path = Path(str(tokenizer.name_or_path)) / "tokenizer.json"
    if str(tokenizer.name_or_path) and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def vocab_sha256(tokenizer: "PreTrainedTokenizerBase") -> str:
    """Hash of what token ids mean: every (token, id) pair, added tokens included.

    Prepared shards record it; training refuses shards whose hash differs from the tokenizer's
    (pre/post-processing settings may differ, the meaning of the ids may not).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def tokenizer_identity(tokenizer: "PreTrainedTokenizerBase") -> dict:
    """What the sidecar of prepared shards records about the tokenizer that made them."""
    return {"name_or_path": str(tokenizer.name_or_path), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256(tokenizer),
            "tokenizer_sha256": tokenizer_sha256(tokenizer), "eos_token_id": tokenizer.eos_token_id}


class MegatronTokenizer:
    """What megatron's GPTDataset reads from a tokenizer, over an HF tokenizer.

    GPTDataset uses `eod` (document separator, found in the data), `pad` (fills short samples and is
    masked out of the loss), `vocab_size` (picks the token dtype) and `unique_identifiers` (hashed into
    the names of its cached index files). `pad` must differ from `eod`: megatron otherwise warns and
    silently stops masking pad positions.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase"):
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token (used as end of document)")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise DataError(
                f"tokenizer {tokenizer.name_or_path!r} needs a pad token distinct from eos "
                f"(pad={tokenizer.pad_token_id}, eos={tokenizer.eos_token_id})"
            )
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # len() counts added tokens, .vocab_size does not
        self.eod = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.unique_identifiers = {
            "class": type(self).__name__,
            "tokenizer_class": type(tokenizer).__name__,
            "name_or_path": str(tokenizer.name_or_path),
            "vocab_size": self.vocab_size,
            # The content hash makes a retrained tokenizer at the same path a different cache key.
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "eod": self.eod,
            "pad": self.pad,
        }

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "MegatronTokenizer":
        return cls(load_tokenizer(path))

    def tokenize(self, text: str) -> list[int]:
        # No BOS/EOS here: documents are joined with `eod` by the data writer, not by the tokenizer.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Any) -> str:
        if hasattr(ids, "tolist"):  # tensors and numpy arrays
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

    def __repr__(self) -> str:
        return f"MegatronTokenizer({self.unique_identifiers['name_or_path']!r}, vocab_size={self.vocab_size})"
