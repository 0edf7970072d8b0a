"""scripts/ablations.py (issue 20): the --quick plumbing check trains and measures every arm, and
an unknown arm is refused by name."""
import importlib.util
import json
import math
import sys

import pytest

from tests.conftest import REPO, child_env, run_group

SCRIPT = REPO / "scripts" / "ablations.py"


def _module():
    spec = importlib.util.spec_from_file_location("nld_ablations", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses resolve the script's annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_measures_every_arm(tmp_path):
    abl = _module()
    r = run_group([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], 600, cwd=REPO, env=child_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    agg = json.loads((tmp_path / "results" / "aggregate.json").read_text())
    assert set(agg["arms"]) == set(abl.ARMS)
    # equal data tokens: 2 + 2 steps of 2 x 128 tokens per two-stage arm, 4 joint steps from scratch
    assert agg["equal_data_tokens"] and agg["data_tokens"] == [4 * 2 * 128]
    for arm in abl.ARMS:
        res = json.loads((tmp_path / "results" / f"{arm}_seed0.json").read_text())
        for key in abl.METRICS:
            assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), (arm, key, res[key])
            assert agg["arms"][arm][key]["n"] == 1
        assert 0 <= res["ar_accuracy"] <= 1 and res["eval_n"] == 2
        assert len(res["runs"]) == (1 if arm == "joint_scratch" else 2)
        if abl.ARMS[arm].sft:
            w = res["weight_distortion"]
            assert w["token_weight_ratio_mean"] == pytest.approx(1.0)
            assert w["token_weight_ratio_min"] <= 1.0 <= w["token_weight_ratio_max"]
    # every two-stage arm reused the seed's one stage-1 run
    assert {json.loads((tmp_path / "results" / f"{a}_seed0.json").read_text())["runs"][0]
            for a in abl.ARMS if a != "joint_scratch"} == {str(tmp_path / "seed_0" / "stage1")}
    assert {c["with"] for c in agg["comparisons"]} >= {"baseline", "ar_on", "sft_combined"}
    tables = (tmp_path / "results" / "tables.md").read_text()
    assert all(f"| `{arm}` | 1 |" in tables for arm in abl.ARMS) and "two-stage vs joint from scratch" in tables
    for png in ("learning_curves.png", "metrics.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 5000


def test_unknown_arm_exits_2_naming_it(tmp_path):
    r = run_group([sys.executable, str(SCRIPT), "--arm", "no_such_arm", "--out", str(tmp_path)], 120,
                  cwd=REPO, env=child_env())
    assert r.returncode == 2 and "no_such_arm" in r.stderr and "baseline" in r.stderr, r.stderr
    assert not (tmp_path / "results").exists()


def test_comparison_verdicts():
    abl = _module()
    arm = lambda vals: abl.spread(vals)   # noqa: E731
    # accuracy: higher is better; each arm's sample sd is 0.14 / sqrt(2) = 0.099, so
    # se = sqrt(2 * 0.099^2 / 2) * 100 = 9.9 points
    assert abl.compare(arm([0.5, 0.64]), arm([0.1, 0.24]), "ar_accuracy")["verdict"] == "agrees"
    assert abl.compare(arm([0.1, 0.24]), arm([0.5, 0.64]), "ar_accuracy")["verdict"] == "disagrees"
    near = abl.compare(arm([0.5, 0.64]), arm([0.4, 0.54]), "ar_accuracy")
    assert near["verdict"] == "within noise" and near["delta"] == pytest.approx(10.0) and near["se"] == pytest.approx(
        100 * 0.14 / math.sqrt(2))
    # losses: lower is better
    assert abl.compare(arm([1.0, 1.01]), arm([2.0, 2.01]), "val_loss_ar")["verdict"] == "agrees"
    assert abl.compare(arm([0.0, 0.0]), arm([0.0, 0.0]), "diffusion_accuracy")["verdict"] == "within noise"
    assert abl.compare(arm([0.3]), arm([0.2]), "ar_accuracy")["verdict"] == "one seed: no spread"
