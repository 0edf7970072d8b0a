"""The arithmetic demo domain (issue 19): the seeded generator, its held-out split, the character
tokenizer, the corpus, the nld-eval task's answer checking, and the decoding table's accuracy
column and timing order."""
import json
import re

import pytest

from nld_train.data import demo_math as M
from nld_train.inference.table import decode_table, timing_order
from tests.test_inference_invariants import random_model

STEP = re.compile(r"(First|Next|Then) (\d+)([+-])(\d+)=(\d+)\.")


def test_generator_is_a_pure_function_of_split_n_and_seed():
    a = M.problems("train", 300, seed=0)
    assert a == M.problems("train", 300, seed=0)
    assert a[:100] == M.problems("train", 100, seed=0)          # a prefix does not depend on n
    assert a != M.problems("train", 300, seed=1)
    # pinned: a changed generator must bump GENERATOR_VERSION (the corpus cache is keyed on it)
    assert M.problems("heldout", 1)[0].text == (
        "Q: Gus has 11 keys. First Gus gets 5. Next Gus buys 4. How many keys now?\n"
        "A: Gus has 11. First 11+5=16. Next 16+4=20. The answer is 20.\n")
    with pytest.raises(ValueError, match="split"):
        M.problems("test", 1)


def test_held_out_questions_never_occur_in_training():
    held = M.problems("heldout", 1000)
    assert len({p.question for p in held}) == 1000 and all(M.is_held_out(p.question) for p in held)
    train = M.problems("train", 20000)
    assert not any(M.is_held_out(p.question) for p in train)
    assert not {p.question for p in held} & {p.question for p in train}
    # ... also for the training streams of other seeds
    assert not {p.question for p in held} & {p.question for p in M.problems("train", 5000, seed=7)}


def test_worked_solutions_are_exact_and_of_fixed_layout():
    lengths = {}
    for p in M.problems("train", 2000) + M.problems("heldout", 200):
        steps = STEP.findall(p.solution)
        assert len(steps) in M.STEPS and p.solution.endswith(f" The answer is {p.answer}.\n")
        name, value = re.match(r"Q: (\w+) has (\d+) ", p.question).groups()
        value = int(value)
        assert p.solution.startswith(f"A: {name} has {value}. First ")
        for (marker, a, op, d, c), want in zip(steps, M.MARKERS[:len(steps)], strict=True):
            assert marker == want and f" {marker} {name} " in p.question
            assert int(a) == value and M.MIN_VALUE <= int(c) <= M.MAX_VALUE
            value = int(a) + int(d) if op == "+" else int(a) - int(d)
            assert value == int(c)
        assert value == p.answer
        assert p.prompt + p.completion == p.text
        assert set(p.text) <= set(M.ALPHABET)
        # the answer's layout depends on the number of steps only: every character's position is
        # known before the digits are (what lets block diffusion commit the template in parallel)
        layout = re.sub(r"\d", "0", re.sub(r"^ \w+", " Xxx", p.completion)).replace("-", "+")
        assert lengths.setdefault(len(steps), layout) == layout
    assert len(lengths) == len(M.STEPS)


def test_answer_checking():
    p = M.problems("heldout", 1)[0]
    assert M.check_answer(p.completion, p.answer)
    assert not M.check_answer(p.completion.replace(f"is {p.answer}.", f"is {p.answer + 1}."), p.answer)
    assert M.extract_answer(" 3+4=7.") is None
    # only the first line counts: the next problem a model may go on to write is not its answer
    assert M.extract_answer(" 1+1=2. The answer is 2.\nQ: The answer is 5.") == 2
    assert M.extract_answer("\nThe answer is 5.") is None
    assert M.extract_answer(" The answer is -3.") == -3


def test_packaged_tokenizer_is_the_built_one():
    from nld_train.data.tokenizer import load_tokenizer
    packaged = json.loads((M.TOKENIZER_DIR / "tokenizer.json").read_text())
    built = json.loads(M.build_tokenizer().to_str())
    assert packaged["model"]["vocab"] == built["model"]["vocab"]
    assert packaged["post_processor"] == built["post_processor"]
    tok = load_tokenizer(M.TOKENIZER_DIR)
    assert (tok.eos_token_id, tok.mask_token_id, tok.pad_token_id) == (0, 1, 2) and len(tok) <= 128
    p = M.problems("heldout", 1)[0]
    ids = tok.encode(p.prompt)            # special tokens: the document separator first, as in training
    assert ids[0] == tok.eos_token_id and len(ids) == len(p.prompt) + 1
    assert tok.decode(tok.encode(p.text, add_special_tokens=False)) == p.text
    with pytest.raises(ValueError, match="outside the demo_math alphabet"):
        M.encode_checked(M.build_tokenizer(), "Q: 3 × 4")


def test_corpus_holds_the_training_problems(tmp_path):
    from nld_train.data.demo_corpus import ensure_math_corpus
    from nld_train.data.indexed import token_dtype, validate_indexed_prefix
    prefix = ensure_math_corpus(tmp_path, n=40)
    assert ensure_math_corpus(tmp_path, n=40) == prefix             # cached
    info = validate_indexed_prefix(prefix)
    problems = M.problems("train", 40)
    assert info.documents == 40 and info.tokens == sum(len(p.text) + 1 for p in problems)
    import numpy as np
    ids = np.fromfile(prefix + ".bin", dtype=token_dtype(len(M.SPECIAL_TOKENS) + len(M.ALPHABET)))
    tok = M.build_tokenizer()
    first = ids[: len(problems[0].text) + 1].tolist()
    assert first[-1] == 0 and tok.decode(first[:-1]) == problems[0].text


def test_eval_task_scores_held_out_problems():
    from nld_train.cli import task_prompts
    from nld_train.eval.settings import EvalSettings, validate_settings
    from nld_train.eval.tasks import get_task
    validate_settings(EvalSettings(tasks=["demo_math"]))
    task = get_task("demo_math")
    samples = task.samples()
    held = M.problems("heldout", len(samples))
    assert len(samples) == task.size and [s.question for s in samples] == [p.question for p in held]
    s, p = samples[3], held[3]
    assert task.fewshot_prompt(s, 0).text == p.prompt
    assert task.check(s, p.completion + "Q: Ben has 2 pens.", "fewshot", None, None) == \
        {"correct": True, "extracted": p.answer}
    assert task.check(s, " 1+1=2. The answer is 999.\n", "fewshot", None, None)["correct"] is False
    prompts, check = task_prompts("demo_math", 5)
    assert prompts == [q.prompt for q in held[:5]]
    assert check(2, held[2].completion) and not check(2, held[3].completion.replace(str(held[3].answer), "x"))


def test_decode_config_keys_are_checked():
    from nld_train.cli import load_config
    from nld_train.config import ConfigError
    base = ["recipe=smoke", "wandb.mode=disabled"]
    with pytest.raises(ConfigError, match=r"train\.decode_task: unknown task 'nope'"):
        load_config(base + ["train.decode_task=nope"])
    with pytest.raises(ConfigError, match=r"train\.decode_task: set either"):
        load_config(base + ["train.decode_task=demo_math", "train.decode_prompts=[a]"])
    with pytest.raises(ConfigError, match=r"train\.decode_repeats"):
        load_config(base + ["train.decode_repeats=-1"])
    assert load_config(base + ["train.decode_task=demo_math"]).train.decode_task == "demo_math"


def test_timing_order_alternates():
    keys = ["ar", "diffusion@0.9", "linear_spec"]
    order = timing_order(keys, 3)
    assert [k for _, k in order] == keys + keys[::-1] + keys
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3
    assert timing_order(keys, 0) == []


class CharTokenizer:
    """Ids 3.. for characters 'a'.. (enough for the random model's 48 ids)."""
    eos_token_id, pad_token_id = 0, 2

    def encode(self, text, add_special_tokens=False):
        return ([0] if add_special_tokens else []) + [3 + (ord(c) - 97) % 45 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i - 3) for i in ids if i > 2)


@pytest.mark.usefixtures("one_thread")
def test_table_accuracy_column_and_measurement_order(monkeypatch):
    import nld_train.inference.table as T
    model, tok = random_model(3), CharTokenizer()
    prompts = ["abc", "hello", "xy", "qrstu", "m"]
    ids, mask = T.encode_batch(tok, prompts, add_special_tokens=True)
    out, _ = model.ar_generate(ids, 16, attention_mask=mask)
    st = model.last_stats
    ar_text = [tok.decode(out[i, ids.shape[1]: ids.shape[1] + n].tolist()) for i, n in enumerate(st.new_tokens)]
    calls = []
    real_decode = T.decode

    def recording_decode(m, mode, ids, *a, **kw):   # (mode, batch rows, threshold) of every decode
        calls.append((mode, ids.shape[0], a[2]))
        return real_decode(m, mode, ids, *a, **kw)
    monkeypatch.setattr(T, "decode", recording_decode)
    # "correct" = AR's text, so greedy self-speculation must score 5/5 and diffusion its text == AR count
    table = decode_table(model, tok, prompts, max_new_tokens=16, block_length=8, thresholds=(0.9, 0.5),
                         sol=True, check=lambda i, text: text == ar_text[i], batch_size=2, repeats=2,
                         add_special_tokens=True)
    lines = table.splitlines()
    assert lines[1].split() == ["mode", "TPF", "TPF/SOL", "tok/draft", "NFE", "tokens/s", "text", "==", "AR",
                                "accuracy"]
    rows = {ln.split()[0]: ln.split() for ln in lines[3:] if ln.split() and ln.split()[0] in
            ("ar", "diffusion@0.9", "diffusion@0.5", "linear_spec", "quadratic_spec")}
    assert len(rows) == 5
    for key in ("ar", "linear_spec", "quadratic_spec"):
        assert rows[key][6:8] == ["5/5", "5/5"], rows[key]
    for key in ("diffusion@0.9", "diffusion@0.5"):
        assert rows[key][6].split("/")[0] == rows[key][7].split("/")[0]
    sol = next(ln.split() for ln in lines if ln.startswith("SOL oracle"))
    assert sol[3] == "1.00"
    for r in rows.values():     # TPF/SOL is the row's TPF over the SOL row's
        assert abs(float(r[2]) - float(r[1]) / float(sol[2])) < 0.01
    assert "SOL oracle" in table and "median of 2 timed decodes" in table
    keys = ["ar", "diffusion@0.9", "diffusion@0.5", "linear_spec", "quadratic_spec"]
    thr = {"ar": 0.9, "diffusion@0.9": 0.9, "diffusion@0.5": 0.5, "linear_spec": 0.9, "quadratic_spec": 0.9}
    measured = [(k.split("@")[0], b, thr[k]) for b in (2, 2, 1) for k in keys]     # 3 batches of 5 prompts
    timed = [(k.split("@")[0], 2, thr[k]) for k in keys + keys[::-1]]              # the first batch, alternating
    assert calls == measured + timed
    with pytest.raises(ValueError, match="repeats"):
        decode_table(model, tok, prompts, max_new_tokens=16, block_length=8, repeats=-1)


def test_addon_windows_refuse_data_of_another_vocabulary(tmp_path):
    """An add-on (sampler, LoRA drafter) reading data tokenised for another model gets an error
    naming the data and the base model's vocabulary, not an embedding IndexError mid-run."""
    from nld_train.addons.text import token_windows
    from nld_train.data.demo_corpus import ensure_math_corpus
    from nld_train.errors import DataError
    prefix = ensure_math_corpus(tmp_path, n=40)
    w = token_windows(prefix, 4, 16, seed=0, holdout_fraction=0.25, holdout=False, vocab_size=128)
    assert w.shape == (4, 16) and int(w.max()) < 128
    with pytest.raises(DataError, match=r"outside the base model's vocabulary \(40 ids\).*data=demo_math"):
        token_windows(prefix, 4, 16, seed=0, holdout_fraction=0.25, holdout=False, vocab_size=40)
