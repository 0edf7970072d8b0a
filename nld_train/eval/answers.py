"""Answer extraction and checking: GSM8K numbers, MATH boxed answers, code post-processing.

Pure functions on strings (no model, no sandbox), tested on hand-written cases in
tests/test_eval_answers.py. The rules are documented in docs/evaluation.md.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

# -- shared ---------------------------------------------------------------------------------------


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence (the decoders stop only at EOS, so
    the few-shot formats' stop strings are applied here, to the text that is scored)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


# -- GSM8K ----------------------------------------------------------------------------------------
_NUM = r"-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"


def normalize_number(s: Optional[str]) -> Optional[Decimal]:
    """'1,234.50' / '$18' / '18.' / '-3' -> Decimal; None if it is not a number."""
    if s is None:
        return None
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if s.startswith("\\$"):
        s = s[2:]
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def extract_gsm8k(text: str) -> Optional[str]:
    """The model's final number: the last of '#### N', '\\boxed{N}', 'the answer is N' (in that
    order of preference); otherwise the last number in the text; None if there is none."""
    for pattern in (r"####\s*(" + _NUM + ")", r"\\boxed\{\s*(" + _NUM + r")\s*\}",
                    r"[Tt]he (?:final )?answer is[:\s]*(" + _NUM + ")"):
        hits = re.findall(pattern, text)
        if hits:
            return hits[-1].strip()
    hits = re.findall(_NUM, text)
    return hits[-1].strip() if hits else None


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K solution ('... #### 1,234' -> '1234')."""
    m = re.search(r"####\s*(.+)$", answer.strip())
    if not m:
        raise ValueError(f"GSM8K answer without '#### N': {answer[-80:]!r}")
    return m.group(1).strip().replace(",", "")


def check_gsm8k(generation: str, gold: str) -> tuple[bool, Optional[str]]:
    """(correct, extracted): numeric equality after removing commas, '$' and a trailing period."""
    pred = extract_gsm8k(generation)
    p, g = normalize_number(pred), normalize_number(gold)
    if g is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return (p is not None and p == g), pred


# -- MATH -----------------------------------------------------------------------------------------


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; also ``\\boxed N``);
    None when there is none or its braces never close."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
    if text.startswith(" ", j):                      # '\boxed 5' form
        m = re.match(r"\s+([^\s$]+)", text[j:])
        return m.group(1) if m else None
    if not text.startswith("{", j):
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


def extract_math(text: str) -> Optional[str]:
    """The last boxed answer; else Minerva's 'The final answer is X' sentence; else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (r"[Ff]inal answer is\s*\$?(.+?)\$?\s*(?:\.\s*I hope it is correct|\n|$)",
                    r"[Ff]inal [Aa]nswer:\s*\$?(.+?)\$?\s*(?:\n|$)"):
        m = re.findall(pattern, text)
        if m:
            return m[-1].strip()
    return None


def normalize_math(s: str) -> str:
    """A light, purely textual normal form: no spaces, \\left/\\right, \\!, text wrappers, dfrac ->
    frac, degree signs, '\\%', surrounding '$', trailing '.'."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                 ("%", ""), ("\\displaystyle", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s


def check_math(generation: str, gold: str) -> tuple[bool, Optional[str]]:
    """(correct, extracted). Equal normal forms, or equivalent per ``math_verify`` (symbolic and
    numeric comparison of the two LaTeX expressions)."""
    pred = extract_math(generation)
    if pred is None:
        return False, None
    if normalize_math(pred) == normalize_math(gold):
        return True, pred
    from math_verify import parse, verify
    g = parse("$\\boxed{" + gold + "}$")
    p = parse("$\\boxed{" + pred + "}$")
    return bool(g and p and verify(g, p)), pred


def math_gold(solution: str) -> str:
    """The reference answer of a MATH solution: its last ``\\boxed{}``."""
    b = last_boxed(solution)
    if b is None:
        raise ValueError(f"MATH solution without \\boxed{{}}: {solution[-80:]!r}")
    return b


# -- code -----------------------------------------------------------------------------------------


def code_block(text: str) -> Optional[str]:
    """The first fenced code block (```python ... ``` or ``` ... ```); an unterminated final block
    counts up to the end; None when there is no fence."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", text, re.S)
    return m.group(1) if m else None
