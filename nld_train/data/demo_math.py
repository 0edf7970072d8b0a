"""The arithmetic demo domain: seeded multi-step word problems with worked, exactly checkable answers,
and the fixed character vocabulary they are tokenised with.

    Q: Ivy has 14 pens. First Ivy finds 7. Next Ivy loses 5. Then Ivy buys 3. How many pens now?
    A: Ivy has 14. First 14+7=21. Next 21-5=16. Then 16+3=19. The answer is 19.

A problem is a pure function of (split, seed, index), so the corpus, the held-out problems and every
accuracy figure are reproducible on any machine without a download. Which split a problem belongs to
is decided by a hash of its question (bucket 0 of 10 is held out), so no held-out question can occur
in the training corpus, whatever seeds and sizes are used.

The format is chosen, by measurement, for a tiny model trained for minutes on a CPU (issue 19:
accuracy beside speed); docs/recipes.md has the numbers:
- the numbers are small (start 10..39, steps of 1..9, every value 10..60) and each step is written
  out, so the arithmetic is a small table;
- every number the worked answer needs is found by matching text, not by counting: the answer
  opens by copying the question's first clause (``Ivy has 14``) and each action sentence starts
  with its own marker word (First / Next / Then) that the worked step repeats. Without these
  (generator version 1) most errors of a 600-step model were a number copied from the wrong
  sentence;
- every value has two digits and every step one, and names have three letters, so the position of
  every character of the answer is known before any digit is: block diffusion can commit the
  template and the copied operands of a block in its first passes and leave the computed digits
  for later ones.
Characters, not BPE pieces, are the tokens: every digit is its own prediction.

Standard library only; :func:`build_tokenizer` imports ``tokenizers`` when called.
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

# Bump when the problem distribution or the text format changes: the corpus cache name includes it.
GENERATOR_VERSION = 3

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Joe", "Kim", "Lee")
ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "eggs", "cups", "keys")
ADD_VERBS = ("gets", "finds", "buys", "wins")
SUB_VERBS = ("loses", "sells", "gives away", "uses")
START_RANGE = (10, 39)
DELTA_RANGE = (1, 9)
MIN_VALUE, MAX_VALUE = 10, 60
STEPS = (2, 3)
MARKERS = ("First", "Next", "Then")     # one per step, in the question and in the worked answer

HELD_OUT_BUCKETS = 10     # a question is held out when its hash falls into bucket 0 of these
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")

# Specials first, so that their ids are fixed: <|endoftext|> = 0 (eos/bos/eod), <|mask|> = 1 (the
# diffusion mask of model=tiny), <|pad|> = 2; then one id per character.
SPECIAL_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")
ALPHABET = "\n " + string.digits + string.ascii_letters + ".,:;?!=+-*/()'"
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_math_tokenizer"


@dataclass(frozen=True)
class Problem:
    question: str        # "Q: ... How many pens now?\n"
    solution: str        # "A: 14+7=21. ... The answer is 19.\n"
    answer: int

    @property
    def prompt(self) -> str:
        """What a model is given: the question and the answer's opening."""
        return self.question + "A:"

    @property
    def completion(self) -> str:
        """What a correct greedy model writes after :attr:`prompt` (then end of text)."""
        return self.solution[len("A:"):]

    @property
    def text(self) -> str:
        return self.question + self.solution


def is_held_out(question: str) -> bool:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def _draw(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(*START_RANGE)
    start, acts, lines = value, [], []
    for marker in MARKERS[:rng.choice(STEPS)]:
        d = rng.randint(*DELTA_RANGE)
        # stay within MIN_VALUE..MAX_VALUE (two digits): otherwise the other operation
        add = rng.random() < 0.5
        if add and value + d > MAX_VALUE:
            add = False
        if not add and value - d < MIN_VALUE:
            add = True
        new = value + d if add else value - d
        acts.append(f"{marker} {name} {rng.choice(ADD_VERBS if add else SUB_VERBS)} {d}.")
        lines.append(f"{marker} {value}{'+' if add else '-'}{d}={new}.")
        value = new
    question = f"Q: {name} has {start} {item}. {' '.join(acts)} How many {item} now?\n"
    solution = f"A: {name} has {start}. {' '.join(lines)} The answer is {value}.\n"
    return Problem(question, solution, value)


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "heldout"): a pure function of the arguments.

    Draws from one seeded stream and keeps those whose question falls on the split's side of the
    hash; held-out questions are also made unique (each counts once in an accuracy)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # the split name is part of the seed, so the two streams are independent as well as disjoint
    rng = random.Random(f"nld-demo-math/{GENERATOR_VERSION}/{split}/{seed}")
    want_held = split == "heldout"
    out, seen = [], set()
    while len(out) < n:
        p = _draw(rng)
        if is_held_out(p.question) != want_held:
            continue
        if want_held:
            if p.question in seen:
                continue
            seen.add(p.question)
        out.append(p)
    return out


def extract_answer(generation: str) -> int | None:
    """The number after "The answer is" in the first line of ``generation`` (None if absent)."""
    m = ANSWER_RE.search(generation.split("\n", 1)[0])
    return int(m.group(1)) if m else None


def check_answer(generation: str, answer: int) -> bool:
    return extract_answer(generation) == answer


def build_tokenizer():
    """The character-level ``tokenizers.Tokenizer`` of :data:`ALPHABET` (deterministic, nothing
    trained). Encoding with special tokens prepends <|endoftext|>, the separator every document
    follows in the concatenated training stream; text outside the alphabet is refused by
    :func:`encode_checked`, not dropped."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    # BPE without merges and without a pre-tokenizer: one token per character
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return tok


def encode_checked(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` (no specials) with a ``tokenizers.Tokenizer``; every character must be in the
    alphabet (a BPE without an unknown token would silently drop it)."""
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise ValueError(f"characters outside the demo_math alphabet: {bad}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != len(text):
        raise RuntimeError(f"demo_math tokenizer: {len(text)} characters gave {len(ids)} ids")
    return ids


def write_tokenizer(folder: str | Path = TOKENIZER_DIR) -> Path:
    """Write the HF tokenizer folder (tokenizer.json + tokenizer_config.json) of :func:`build_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", pad_token="<|pad|>", mask_token="<|mask|>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    return folder


if __name__ == "__main__":   # regenerate the packaged tokenizer: python -m nld_train.data.demo_math
    print(write_tokenizer())
