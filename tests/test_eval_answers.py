"""Answer extraction and checking on hand-written generations: right, wrong, malformed."""
from decimal import Decimal

import pytest

from nld_train.eval import answers as A


@pytest.mark.parametrize("text, gold, ok, extracted", [
    ("Janet sells 9 eggs. 9 * 2 = 18. So the answer is 18.", "18", True, "18"),
    ("She makes $1,234.50 in total.\n#### 1,234.5", "1234.5", True, "1,234.5"),
    ("The answer is $18.", "18", True, "$18"),
    ("So the total is \\boxed{42}.", "42", True, "42"),
    ("first 3 then 5 then 7", "7", True, "7"),                     # last number as the fallback
    ("So the answer is 17. Question: 18 apples", "18", False, "17"),  # 'the answer is' beats the last number
    ("The answer is -3", "-3", True, "-3"),
    ("The answer is 18", "19", False, "18"),                       # wrong
    ("I do not know.", "18", False, None),                          # malformed: no number at all
    ("", "5", False, None),
])
def test_gsm8k(text, gold, ok, extracted):
    assert A.check_gsm8k(text, gold) == (ok, extracted)


def test_gsm8k_numbers_and_gold():
    assert A.normalize_number("1,000") == Decimal(1000) == A.normalize_number("1000.00")
    assert A.normalize_number("$5.") == Decimal(5)
    assert A.normalize_number("five") is None and A.normalize_number("1.2.3") is None
    assert A.gsm8k_gold("3 + 4 = <<3+4=7>>7\n#### 2,125") == "2125"
    with pytest.raises(ValueError):
        A.gsm8k_gold("no marker")
    with pytest.raises(ValueError):
        A.check_gsm8k("The answer is 3", "three")


def test_stop_sequences_cut_the_scored_text():
    gen = " 3 + 4 = 7. So the answer is 7.\n\nQuestion: Tom has 9 apples. Answer: 9"
    assert A.cut_at_stops(gen, ("Question:", "\n\n")) == " 3 + 4 = 7. So the answer is 7."
    assert A.check_gsm8k(A.cut_at_stops(gen, ("Question:", "\n\n")), "7") == (True, "7")


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("nested \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)} done", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("two: \\boxed{1} then \\boxed{2}", "2"),
    ("spaced \\boxed 5 ok", "5"),
    ("\\fbox{7}", "7"),
    ("Final Answer: The final answer is $24$. I hope it is correct.", "24"),
    ("unbalanced \\boxed{\\frac{1}{2}", None),                     # malformed
    ("no answer here", None),
])
def test_math_extraction(text, expected):
    assert A.extract_math(text) == expected


@pytest.mark.parametrize("gen, gold, ok", [
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),                # textual normal form
    ("\\boxed{0.5}", "\\frac{1}{2}", True),                           # math_verify: numeric equality
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3,\\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{[2,5)}", "[2,5)", True),
    ("\\boxed{[2,5]}", "[2,5)", False),                               # wrong: closed interval
    ("\\boxed{3}", "\\frac{1}{2}", False),                            # wrong
    ("The answer is one half", "\\frac{1}{2}", False),                # malformed: nothing to extract
])
def test_math_check(gen, gold, ok):
    assert A.check_math(gen, gold)[0] is ok


def test_math_gold_is_the_last_box_of_the_solution():
    assert A.math_gold("we get $\\boxed{2}$, so ... $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    with pytest.raises(ValueError):
        A.math_gold("no box")


def test_code_block_extraction():
    assert A.code_block("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert A.code_block("```\nx = 1\n") == "x = 1\n"          # unterminated final block
    assert A.code_block("no fence") is None


def test_task_programs_are_built_from_the_generation():
    """HumanEval: prompt + completion cut at the stop strings + tests + check(); chat answers that
    define the function replace the prompt. MBPP: code + setup + asserts."""
    from nld_train.eval.tasks import MBPP, HumanEval, Sample
    h = HumanEval()
    s = Sample(0, "HumanEval/x", "def add(a, b):\n", "def check(c):\n    assert c(1, 2) == 3\n", {"entry_point": "add"})
    prog = h.program(s, "    return a + b\n\ndef helper():\n    pass\n", "fewshot")
    assert prog.startswith("def add(a, b):\n    return a + b\n") and "helper" not in prog
    assert prog.rstrip().endswith("check(add)")
    chat = h.program(s, "Here:\n```python\ndef add(a, b):\n    return b + a\n```", "chat")
    assert chat.startswith("def add(a, b):\n    return b + a\n") and chat.count("def add") == 1
    m = MBPP()
    ms = Sample(0, "11", "Write add.\nassert add(1, 2) == 3", "\nassert add(1, 2) == 3\n")
    assert m.program(ms, "def add(a, b):\n    return a + b\n```\nassert add(0, 0) == 1", "fewshot") == \
        "def add(a, b):\n    return a + b\n\n\nassert add(1, 2) == 3\n"
