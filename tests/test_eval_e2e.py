"""A tiny end-to-end evaluation on a trained smoke checkpoint: every task and mode, the counts
against docs/decoding.md, resuming, refusal of mixed settings, the CLI, and the training hook."""
import json

import pytest

from nld_train.errors import ConfigError
from nld_train.eval.settings import EvalSettings

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("accuracy", "nfe", "generated_tokens", "tpf", "tokens_per_s", "n")
MODE_KEYS = ["ar", "diffusion@0.9", "diffusion@0.5", "linear_spec", "quadratic_spec"]


@pytest.fixture(scope="module")
def trained(dist1, tmp_path_factory):
    """2 joint steps of the smoke recipe with the in-training eval hook on at step 2; the final
    checkpoint loaded back for decoding."""
    from nld_train.eval.hook import eval_during_training
    from nld_train.inference import load_model, load_tokenizer
    from tests.test_trainer import make_trainer
    tmp = tmp_path_factory.mktemp("eval")
    tr = make_trainer(tmp, "train.max_steps=2", "eval.interval=2", "eval.tasks=[gsm8k]", "eval.limit=2",
                      "eval.max_new_tokens=16", "eval.modes=[ar,linear_spec]", name="run",
                      eval_hook=eval_during_training)
    try:
        tr.fit()
    finally:
        tr.close()
    return tmp / "run", load_model(tmp / "run"), load_tokenizer(tmp / "run")


def settings(**kw):
    base = dict(tasks=["gsm8k", "humaneval", "mbpp", "math500"], thresholds=[0.9, 0.5], limit=2, batch_size=2,
                max_new_tokens=16, progress=False, exec_timeout=10)
    return EvalSettings(**{**base, **kw})


def test_training_hook_logged_the_eval(trained):
    run, _, _ = trained
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2 and 0 <= last["eval/gsm8k/ar/accuracy"] <= 1
    assert last["eval/gsm8k/ar/tpf"] == 1.0 and last["eval/gsm8k/linear_spec/tpf"] > 0   # 1..B per 2 passes
    assert "eval/gsm8k/ar/accuracy" not in rows[0]
    assert (run / "eval" / "step_00000002" / "results.json").is_file()


def test_end_to_end_all_tasks_and_modes(trained, tmp_path):
    from nld_train.eval.runner import evaluate
    run, model, tok = trained
    out = tmp_path / "ev"
    res = evaluate(model, tok, settings(), out, checkpoint=str(run))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"].keys() == {"gsm8k", "humaneval", "mbpp", "math500"}
    for task, info in on_disk["tasks"].items():
        assert list(info["modes"]) == MODE_KEYS
        assert info["sol_tpf"] >= 1.0 and info["max_new_tokens"] == 16 and info["block_length"] == 16
        for key, r in info["modes"].items():
            assert all(r[f] is not None for f in FIELDS), (task, key, r)
            assert r["n"] == 2 and r["tpf"] == pytest.approx(r["generated_tokens"] / r["nfe"])
            lines = [json.loads(ln) for ln in (out / "samples" / task / f"{key}.jsonl").read_text().splitlines()]
            assert [ln["idx"] for ln in lines] == [0, 1]
            assert sum(ln["generated_tokens"] for ln in lines) == r["generated_tokens"]
            assert r["tokens_per_draft"] == pytest.approx(sum(ln["draft_tokens"] for ln in lines)
                                                          / sum(ln["draft_passes"] for ln in lines))
            assert all("generation" in ln and isinstance(ln["correct"], bool) for ln in lines)
        assert info["modes"]["ar"]["tpf"] == 1.0   # AR: one pass per token, the prefill included
        assert info["modes"]["ar"]["tokens_per_draft"] == 1.0
        assert (out / "plots" / f"{task}.png").stat().st_size > 5000
    # greedy self-speculation emits AR's tokens: the same generations, fewer passes
    for task in ("gsm8k", "humaneval"):
        read = lambda k: [json.loads(ln)["generation"]   # noqa: E731
                          for ln in (out / "samples" / task / f"{k}.jsonl").read_text().splitlines()]  # noqa: B023 (called within this loop iteration)
        assert read("linear_spec") == read("ar") == read("quadratic_spec")
    code = [json.loads(ln) for ln in (out / "samples" / "humaneval" / "ar.jsonl").read_text().splitlines()]
    assert all(ln["exec_status"] in ("passed", "failed", "timeout") for ln in code)
    assert on_disk["sandbox"]["uid"] is not None
    table = (out / "results.md").read_text()
    assert "| gsm8k | diffusion@0.5 |" in table and "SOL oracle" in table
    assert res["tasks"]["gsm8k"]["modes"]["ar"]["accuracy"] == on_disk["tasks"]["gsm8k"]["modes"]["ar"]["accuracy"]

    # a larger limit extends the run; a batch cut by a crash (mid-line) is decoded again, alone
    calls = []
    orig = model.ar_generate

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return orig(*a, **k)
    model.ar_generate = counting
    only_ar = dict(tasks=["gsm8k"], modes=["ar"], sol=False, limit=3)
    try:
        res = evaluate(model, tok, settings(**only_ar), out, checkpoint=str(run))
        # batch 0 (samples 0, 1) kept; batch 1 (sample 2) new: its one-block warm-up, then its decode
        assert calls == [1, 1]
        f = out / "samples" / "gsm8k" / "ar.jsonl"
        full = f.read_text()
        f.write_text(full[: full.rindex("\n", 0, len(full) - 1) + 20])
        again = evaluate(model, tok, settings(**only_ar), out, checkpoint=str(run))
    finally:
        del model.ar_generate
    assert calls == [1, 1, 1, 1]                 # only the cut batch was decoded again (warm-up + decode)
    untimed = lambda d: {k: v for k, v in d.items() if k not in ("batch_seconds", "tokens_per_s", "seconds")}  # noqa: E731
    lines = lambda text: [untimed(json.loads(ln)) for ln in text.splitlines()]  # noqa: E731
    assert lines(f.read_text()) == lines(full)   # the same, deterministic, records
    assert untimed(again["tasks"]["gsm8k"]["modes"]["ar"]) == untimed(res["tasks"]["gsm8k"]["modes"]["ar"])

    # other settings in the same out dir are refused, naming what changed; nothing is deleted
    with pytest.raises(ConfigError, match="max_new_tokens: 16 -> 32"):
        evaluate(model, tok, settings(**only_ar, max_new_tokens=32), out, checkpoint=str(run))
    assert lines(f.read_text()) == lines(full)


def test_prompts_fall_back_to_fewer_shots(trained):
    from nld_train.eval.runner import build_prompt
    from nld_train.eval.tasks import get_task
    _, _, tok = trained
    task = get_task("gsm8k")
    s = task.samples()[0]
    full = build_prompt(task, s, "fewshot", 8, tok, 10_000)
    assert full.shots == 8 and not full.too_long
    short = build_prompt(task, s, "fewshot", 8, tok, len(full.ids) - 1)
    assert short.shots == 7 and len(short.ids) < len(full.ids)
    zero = build_prompt(task, s, "fewshot", 8, tok, 120)
    assert zero.shots == 0 and not zero.too_long
    assert tok.decode(zero.ids).endswith(f"Question: {s.question}\nAnswer:")
    assert build_prompt(task, s, "fewshot", 8, tok, 5).too_long


def test_cli(trained, tmp_path, capsys):
    from nld_train.eval.cli import main, parse_args
    run, _, _ = trained
    out = tmp_path / "cli"
    rc = main([f"checkpoint={run}", f"out={out}", "tasks=[gsm8k]", "modes=[ar,diffusion]", "limit=2",
               "max_new_tokens=16", "thresholds=[0.9]", "progress=false", "plots=false", "shots.gsm8k=2",
               "diffusion.causal_context=false"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["gsm8k"]["shots"] == 2 and set(res["tasks"]["gsm8k"]["modes"]) == {"ar", "diffusion@0.9"}
    meta = json.loads((out / "samples" / "gsm8k" / "diffusion@0.9.meta.json").read_text())
    assert meta["decode_kwargs"] == {"causal_context": "False"}     # passed through to generate()
    assert "| gsm8k | ar |" in capsys.readouterr().out
    for bad, msg in (([f"checkpoint={run}", f"out={out}", "tasks=[gsm9k]"], "gsm9k"),
                     ([f"checkpoint={run}", f"out={out}", "modes=[fast]"], "fast"),
                     ([f"checkpoint={run}", f"out={out}", "thresholds=[1.5]"], "thresholds"),
                     ([f"checkpoint={run}", f"out={out}", "limt=3"], "limt"),
                     ([f"checkpoint={run}", f"out={out}", "shots.gsm8k=9", "tasks=[gsm8k]"], "9"),
                     ([f"out={out}"], "checkpoint"),
                     (["checkpoint=/nonexistent", f"out={out}"], "nonexistent")):
        assert main(bad) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ar.threshold"):
        from nld_train.eval.runner import Evaluator
        _, s = parse_args([f"checkpoint={run}", f"out={out}", "ar.threshold=0.5"])
        Evaluator(trained[1], trained[2], s, out)


def test_each_mode_warms_up_once_before_its_timed_batches(trained, tmp_path, monkeypatch):
    """tokens/s must not depend on which mode runs first: every mode's first decode in the process
    is an untimed one-block warm-up of its first batch; the timed decodes follow, and a resumed run
    whose batches are all done decodes nothing."""
    import nld_train.eval.runner as R
    run, model, tok = trained
    calls, real = [], R.decode

    def recording(m, mode, ids, max_new_tokens, *a, **kw):
        calls.append((mode, ids.shape[0], max_new_tokens))
        return real(m, mode, ids, max_new_tokens, *a, **kw)
    monkeypatch.setattr(R, "decode", recording)
    s = settings(tasks=["gsm8k"], thresholds=[0.9], modes=["ar", "linear_spec"], limit=3, sol=False,
                 max_new_tokens=32)
    R.evaluate(model, tok, s, tmp_path / "ev", checkpoint=str(run))
    # the warm-up decodes one block (B = 16) of the first batch, the timed ones max_new_tokens
    assert calls == [("ar", 2, 16), ("ar", 2, 32), ("ar", 1, 32),
                     ("linear_spec", 2, 16), ("linear_spec", 2, 32), ("linear_spec", 1, 32)]
    calls.clear()
    R.evaluate(model, tok, s, tmp_path / "ev", checkpoint=str(run))
    assert calls == []
