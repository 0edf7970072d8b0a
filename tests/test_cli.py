"""`nld-train` as users run it: smoke run, golden loss curve, SIGKILL + resume, config errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nld_train.cli import load_config
from nld_train.config import ConfigError
from tests.conftest import REPO, child_env, run_cli

GOLDEN = Path(__file__).parent / "golden" / "smoke_12steps.json"
SMOKE12 = ["recipe=smoke", "train.max_steps=12", "checkpoint.interval=3"]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted 12-step smoke run, shared by the golden and the resume checks."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    res = run_cli([*SMOKE12, f"run.dir={run_dir}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return run_dir, res


def test_smoke_run_writes_the_run_dir_contract(smoke_run):
    run_dir, res = smoke_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "loss_ar", "loss_diff", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert all(r[key] is not None for r in rows), key
    assert rows[-1]["tokens"] == 12 * 8 * 64  # L per sample; the noisy copy is not counted
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in ckdir.iterdir() if p.name.startswith("step_")) == ["step_00000009", "step_00000012"]
    cfg = (run_dir / "config.yaml").read_text()
    assert "alpha: 0.3" in cfg and "max_steps: 12" in cfg and "${" not in cfg  # fully resolved
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["versions"]["megatron-core"] and prov["world"]["world_size"] == 1
    assert "step 12/12" in res.stdout and "loss_diff" in res.stdout


def test_golden_loss_curve(smoke_run):
    """Catches silent numeric changes. Regenerate deliberately with: python -m tests.test_cli --update"""
    run_dir, _ = smoke_run
    golden = json.loads(GOLDEN.read_text())
    got = metrics(run_dir)
    for key in ("loss", "loss_ar", "loss_diff", "grad_norm", "lr"):
        for g, r in zip(golden[key], got, strict=True):
            assert r[key] == pytest.approx(g, rel=2e-4, abs=1e-6), (key, r["step"])


def test_sigkill_after_step6_checkpoint_resumes_bit_exact(smoke_run, tmp_path):
    """Killed with SIGKILL right after its step-6 checkpoint, restarted unchanged: steps 7-12 equal
    the uninterrupted run bit for bit, and every step appears once in metrics.jsonl."""
    ref_dir, _ = smoke_run
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "nld_train.cli", *SMOKE12, f"run.dir={run_dir}"]
    # own process group: SIGKILL the whole group, megatron's checkpoint-writer helpers included
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=child_env())
    marker = run_dir / "checkpoints" / "step_00000006" / "nld_checkpoint.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the step-6 checkpoint never appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    res = run_cli([*SMOKE12, f"run.dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stdout
    rows, ref = metrics(run_dir), metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for a, b in zip(rows, ref, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


def test_typo_fails_at_once_naming_the_key(tmp_path):
    t0 = time.time()
    res = run_cli(["recipe=smoke", "objective.alpah=0.3", f"run.dir={tmp_path / 'x'}"])
    assert res.returncode == 2
    assert "objective.alpah" in res.stderr
    assert not (tmp_path / "x").exists()
    assert time.time() - t0 < 30  # before any torch/megatron import or data work


def test_help_lists_recipes():
    res = run_cli(["--help"])
    assert res.returncode == 0 and "smoke" in res.stdout and "nld_8b" in res.stdout


@pytest.mark.parametrize("overrides, key", [
    (["train.max_steps=abc"], "train.max_steps"),
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["train.seq_length=72"], "train.seq_length"),  # not a multiple of objective.block_size=16
    (["objective.loss_normalization=mean"], "objective.loss_normalization"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes"),
    (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size"),
    (["parallel.overlap_grad_reduce=false", "parallel.ddp_bucket_size=1000"], "parallel.ddp_bucket_size"),
    (["plan.inter_node_gb_per_s=0"], "plan.inter_node_gb_per_s"),
    (["+train.bogus=1"], "bogus"),
    (["model=nonexistent"], "model"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["recipe=smoke", *overrides], world_size=1)


def test_impossible_layout_for_world_size():
    with pytest.raises(ConfigError, match="data-parallel size"):
        load_config(["recipe=smoke", "train.global_batch_size=8", "train.micro_batch_size=8"], world_size=2)
    with pytest.raises(ConfigError, match="data.path"):
        load_config(["recipe=stage2", "parallel=single"], world_size=1)


def test_demo_pipeline_stages():
    from nld_train.cli import pipeline_configs
    cfg = load_config(["recipe=demo", "run.dir=/tmp/d", "train.max_steps=5"], world_size=1)
    # each later stage takes its model from the stage before (checked before the first one runs)
    stages = pipeline_configs(cfg, ["recipe=demo", "run.dir=/tmp/d", "train.max_steps=5"])
    assert [d for d, _, _ in stages] == ["/tmp/d/stage1", "/tmp/d/stage2"]
    s1, s2 = (c for _, _, c in stages)
    assert s1.model == s2.model and s1.tokenizer == s2.tokenizer
    assert (s1.objective.name, s2.objective.name) == ("ar", "joint")
    assert s1.train.max_steps == s2.train.max_steps == 5
    assert s1.checkpoint.init_from is None and s2.checkpoint.init_from == "/tmp/d/stage1"


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile
    d = Path(tempfile.mkdtemp()) / "run"
    r = run_cli([*SMOKE12, f"run.dir={d}"])
    assert r.returncode == 0, r.stderr
    rows = metrics(d)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({k: [row[k] for row in rows] for k in
                                  ("loss", "loss_ar", "loss_diff", "grad_norm", "lr")}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
