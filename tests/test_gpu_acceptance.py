"""scripts/gpu_acceptance.py: its --cpu mode (every part that needs no CUDA) passes, and its
verdict follows the checks: a failed part makes the exit status 1, parts past the budget are
skipped and said to be."""
import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, child_env, run_group

SCRIPT = REPO / "scripts" / "gpu_acceptance.py"


def _module():
    spec = importlib.util.spec_from_file_location("nld_gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bf16_rope_angles_rounded() -> bool:
    """True while the decoder forms RoPE angles in bf16 (issue 17, item 1): two tokens, the second
    at position 2001 or 2002; both positions round to 2000 in bf16, so with bf16 angles the outputs
    are identical, with fp32 angles they differ."""
    import torch

    from nld_train.inference import NLDConfig, NLDForDecoding
    cfg = NLDConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    m = NLDForDecoding.random(cfg, seed=0, std=0.5).to(torch.bfloat16)
    ids = torch.tensor([[5, 9]])
    with torch.no_grad():
        a, b = (m(ids, torch.tensor([[0, p]]))[0, 1] for p in (2001, 2002))
    return torch.equal(a, b)


@pytest.mark.slow
def test_cpu_mode_passes(tmp_path):
    out = tmp_path / "acc"
    # the budget is generous here: a loaded CI machine must not turn into skipped parts
    r = run_group([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--budget-s", "600"], 900,
                  cwd=REPO, env=child_env())
    res = json.loads((out / "results.json").read_text())
    status = {p["part"]: (p["status"], p["message"]) for p in res["parts"]}
    if _bf16_rope_angles_rounded():  # the acceptance run must catch the known bf16 RoPE defect
        assert status.pop("decode_bf16")[0] == "FAIL" and r.returncode == 1
        res["parts"] = [p for p in res["parts"] if p["part"] != "decode_bf16"]
    else:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert set(status) | {"decode_bf16"} == {name for name, *_ in _module().PARTS}
    for name, (st, msg) in status.items():
        assert st == "pass" or (st, msg) in {("skipped", "needs CUDA"), ("skipped", "no TE")}, (name, st, msg)
    assert status["cuda_tests"][0] == status["cpu_checkpoint_on_cuda"][0] == "skipped"
    trainer = next(p for p in res["parts"] if p["part"] == "trainer")["details"]
    assert trainer["resumed_at"] == 3 and trainer["max_rel_loss_diff"] <= 1e-6
    md = (out / "results.md").read_text()
    assert "| trainer | pass |" in md and "| te | skipped |" in md
    assert (out / "log.txt").stat().st_size > 0


def test_failed_check_exits_nonzero_and_budget_skips(tmp_path, monkeypatch, capsys):
    acc = _module()

    def broken(run):
        raise acc.Failed("loss differs by 3e-1")
    parts = [("env", False, 1, lambda run: ("ok", None)), ("broken", False, 1, broken),
             ("gpu_only", True, 1, lambda run: ("ran", None))]
    monkeypatch.setattr(acc, "PARTS", parts)
    assert acc.main(["--cpu", "--out", str(tmp_path / "a")]) == 1
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [(p["part"], p["status"]) for p in res["parts"]] == [("env", "pass"), ("broken", "FAIL"),
                                                                ("gpu_only", "skipped")]
    assert "| broken | FAIL |" in (tmp_path / "a" / "results.md").read_text()
    parts[1] = ("fine", False, 1, lambda run: ("ok", None))
    assert acc.main(["--cpu", "--out", str(tmp_path / "b"), "--budget-s", "0"]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {p["status"] for p in res["parts"]} == {"skipped"}
    assert "2 part(s) not run: past the budget" in capsys.readouterr().out
