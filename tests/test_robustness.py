"""Robustness: preemption signals, the NaN guard, refused config changes, corrupt checkpoints and
data, async saves and checkpoint retention. In-process where possible, CLI where the exit code and
the one-line error are the contract. The randomised SIGKILL check is scripts/chaos_resume.py."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nld_train.cli import load_config
from nld_train.config import ConfigError
from tests.conftest import REPO, child_env, run_cli
from tests.test_trainer import make_trainer

GOLDEN = Path(__file__).parent / "golden" / "smoke_12steps.json"
SMOKE12 = ["recipe=smoke", "train.max_steps=12", "checkpoint.interval=3"]
# what tests/test_trainer.py::make_trainer composes, as CLI arguments (same config, same run dir)
SMALL = ["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled"]


# -- helpers --------------------------------------------------------------------------------------
def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_metrics_step(run_dir) -> int:
    try:
        rows = metrics(run_dir)
    except ValueError:  # a line being written right now
        return 0
    return rows[-1]["step"] if rows else 0


def snapshot(root) -> dict:
    """Every file under root: size, mtime and content hash (to prove nothing was touched)."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def step_dirs(run_dir) -> list[str]:
    """Checkpoint folders, including left-overs (tmp.*, trash.*) that should not be there."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("nld-train: error:")]


def assert_one_error_line(res, *needles):
    out = res.stdout[-2000:] + res.stderr[-3000:]
    assert res.returncode == 2, f"expected exit code 2, got {res.returncode}:\n{out}"
    lines = error_lines(res.stderr)
    assert len(lines) == 1, f"expected exactly one 'nld-train: error:' line, got {lines}:\n{out}"
    assert "Traceback" not in res.stderr, f"a traceback instead of a one-line error:\n{out}"
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not named in: {lines[0]}"
    return lines[0]


class Cli:
    """`nld-train` in a subprocess of its own process group (stdout/stderr to files); stop() kills
    what is left of it (SIGKILL to the group: megatron's checkpoint writer spawns helpers)."""

    def __init__(self, args, log_dir: Path, name: str):
        self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "nld_train.cli", *args], cwd=REPO, stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=child_env())

    def wait_for(self, predicate, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"nld-train exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
            assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}:\n{self.tail()}"
            time.sleep(0.02)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nld-train did not exit within {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.out.read_text()[-2000:] + "\n--- stderr ---\n" + self.err.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def fit(tr):
    try:
        tr.fit()
    finally:
        tr.close()


def smoke_trainer(run_dir, *overrides):
    """The CLI's smoke config (global batch 8), trained in this process."""
    from nld_train.train.trainer import Trainer
    return Trainer(load_config([*SMOKE12, "wandb.mode=disabled", f"run.dir={run_dir}", *overrides], world_size=1))


# -- preemption -----------------------------------------------------------------------------------
# max_steps is free on resume, but the LR schedule length and megatron's sample count are fixed at
# the first start: pin the schedule length so runs of any max_steps (<= 200) share both.
PREEMPT = ["recipe=smoke", "train.lr_schedule_steps=200", "checkpoint.interval=0", "wandb.mode=disabled"]


def preempt(run_dir, tmp_path, sig, name):
    """Start a long run, send `sig` once step 3 is logged; returns (exit code, output tail)."""
    cli = Cli([*PREEMPT, "train.max_steps=200", f"run.dir={run_dir}"], tmp_path, name)
    try:
        cli.wait_for(lambda: last_metrics_step(run_dir) >= 3, "step 3 in metrics.jsonl")
        cli.proc.send_signal(sig)
        return cli.wait(), cli.tail()
    finally:
        cli.stop()


def check_preempted_checkpoint(run_dir, rc, out, sig):
    from nld_train.checkpoint.preemption import EXIT_PREEMPTED
    assert rc == EXIT_PREEMPTED, f"{sig.name}: exit code {rc}, expected {EXIT_PREEMPTED}:\n{out}"
    rows = metrics(run_dir)
    step = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    assert 3 <= step < 200
    ckdir = Path(run_dir) / "checkpoints"
    assert (ckdir / "latest").is_file(), f"no checkpoint committed on {sig.name}: {step_dirs(run_dir)}\n{out}"
    latest = (ckdir / "latest").read_text().strip()
    assert latest == f"step_{step:08d}", f"latest names {latest}, but the last logged step is {step}"
    assert (ckdir / latest / "nld_checkpoint.json").is_file() and (ckdir / latest / "metadata.json").is_file()
    assert json.loads((ckdir / latest / "nld_checkpoint.json").read_text())["step"] == step
    assert step_dirs(run_dir) == [latest], f"expected only the preemption checkpoint: {step_dirs(run_dir)}"
    assert f"preempted ({sig.name})" in out and f"checkpoint at step {step} committed" in out
    return step


def test_sigterm_saves_at_step_boundary_exits_75_and_resumes_exactly(dist1, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = preempt(run_dir, tmp_path, signal.SIGTERM, "preempted")
    step = check_preempted_checkpoint(run_dir, rc, out, signal.SIGTERM)
    before = metrics(run_dir)
    res = run_cli([*PREEMPT, f"train.max_steps={step + 3}", f"run.dir={run_dir}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in res.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, step + 4)), "every step exactly once"
    assert rows[:step] == before, "the steps before the preemption were rewritten"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step + 3:08d}"
    # the uninterrupted run with the same max_steps, trained in this process (CPU runs are
    # deterministic: in-process and CLI runs agree bit for bit, see the golden-curve tests)
    from nld_train.train.trainer import Trainer
    ref_dir = tmp_path / "ref"
    fit(Trainer(load_config([*PREEMPT, f"train.max_steps={step + 3}", f"run.dir={ref_dir}"], world_size=1)))
    for a, b in zip(rows, metrics(ref_dir), strict=True):
        for key in ("loss", "loss_ar", "loss_diff", "grad_norm", "lr", "skipped_steps"):
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]!r} != uninterrupted {b[key]!r}"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2], ids=["SIGUSR1", "SIGUSR2"])
def test_srun_signals_save_at_step_boundary_in_process(dist1, tmp_path, monkeypatch, capsys, sig):
    """What `srun --signal` delivers: the same save-and-exit-75 path, in this process (the CLI exit
    code itself is checked with SIGTERM above)."""
    from nld_train.checkpoint.preemption import Preempted
    previous = signal.getsignal(sig)
    tr = make_trainer(tmp_path, "train.max_steps=50", "checkpoint.interval=0")
    orig = tr.train_step

    def train_step(step):
        row = orig(step)
        if step == 2:  # arrives during step 3: handled at the step-3 boundary
            os.kill(os.getpid(), sig)
        return row
    monkeypatch.setattr(tr, "train_step", train_step)
    with pytest.raises(Preempted) as e:
        fit(tr)
    assert (e.value.step, e.value.signame) == (3, sig.name)
    step = check_preempted_checkpoint(tmp_path / "run", e.value.code, capsys.readouterr().out, sig)
    assert step == 3
    assert signal.getsignal(sig) == previous, "Trainer.close() did not restore the signal handler"


# -- NaN guard ------------------------------------------------------------------------------------
def nan_sums(tr, monkeypatch, when):
    """Make the objective's loss sums NaN (keeping the graph, so backward runs) when when(tr.step)."""
    orig = tr.objective.sums

    def sums(ce, prep):
        s_ar, s_diff = orig(ce, prep)
        if when(tr.step):
            return s_ar * float("nan"), s_diff * float("nan")
        return s_ar, s_diff
    monkeypatch.setattr(tr.objective, "sums", sums)


def test_nan_step_is_skipped_and_training_continues(dist1, tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, "train.max_steps=4", "checkpoint.interval=0", "checkpoint.save_final=false")
    nan_sums(tr, monkeypatch, lambda step: step == 1)  # the second step (index 1)
    seen = {}
    orig_step = tr.train_step

    def train_step(step):
        before = [p.detach().clone() for p in tr.params]
        row = orig_step(step)
        seen[step] = (before, [p.detach().clone() for p in tr.params], row)
        return row
    monkeypatch.setattr(tr, "train_step", train_step)
    fit(tr)

    before, after, row = seen[1]
    assert not math.isfinite(row["loss"]) and row["skipped_steps"] == 1, row
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a skipped step changed the parameters"
    assert {float(tr.optimizer.state[p]["step"]) for p in tr.params} == {3.0}, "AdamW counted the skipped step"
    for step in (0, 2, 3):
        before, after, row = seen[step]
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), (step, row)
        assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"step index {step} did not update"
        assert all(torch.isfinite(p).all() for p in after), f"non-finite parameters after step index {step}"
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]


def test_consecutive_nan_steps_abort_and_leave_checkpoints(dist1, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tr = make_trainer(tmp_path, "train.max_steps=9", "checkpoint.interval=3", "train.max_consecutive_skipped_steps=3")
    nan_sums(tr, monkeypatch, lambda step: step >= 3)  # steps 4, 5, 6 are NaN: abort inside step 6
    snap = {}
    orig_step = tr.train_step

    def train_step(step):
        if step == 3:  # the step-3 checkpoint is committed by now
            snap["before"] = snapshot(run_dir / "checkpoints")
        return orig_step(step)
    monkeypatch.setattr(tr, "train_step", train_step)
    with pytest.raises(RuntimeError, match=r"3 consecutive steps with a non-finite loss"):
        fit(tr)
    assert "step_00000003/nld_checkpoint.json" in snap["before"]
    assert snapshot(run_dir / "checkpoints") == snap["before"], "the abort touched the checkpoints"
    assert step_dirs(run_dir) == ["step_00000003"]
    assert [r["skipped_steps"] for r in metrics(run_dir)] == [0, 0, 0, 1, 2]


# -- config change on resume ----------------------------------------------------------------------
def test_resume_with_changed_math_is_refused(dist1, tmp_path):
    tr = make_trainer(tmp_path, name="c")
    tr.step = 1
    tr.save()
    tr.close()
    with pytest.raises(ConfigError, match=r"objective\.alpha: 0\.3 -> 0\.5") as e:
        make_trainer(tmp_path, "objective.alpha=0.5", name="c")
    assert "run.allow_config_change=true" in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.seed") as e:
        make_trainer(tmp_path, "train.seed=7", name="c")
    for free in (["run.allow_config_change=true", "objective.alpha=0.5"],
                 ["train.micro_batch_size=1", "train.max_steps=50", "checkpoint.interval=7"]):
        resumed = make_trainer(tmp_path, *free, name="c")
        resumed.close()
        assert resumed.step == 1, free


def test_micro_batch_size_is_math_under_per_microbatch_normalisation(dist1, tmp_path):
    tr = make_trainer(tmp_path, "objective.loss_normalization=per_microbatch", name="p")
    tr.step = 1
    tr.save()
    tr.close()
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        make_trainer(tmp_path, "objective.loss_normalization=per_microbatch", "train.micro_batch_size=1", name="p")


def test_cli_refuses_changed_math_with_one_line_and_touches_nothing(dist1, tmp_path):
    tr = make_trainer(tmp_path, name="c")
    tr.step = 1
    tr.save()
    tr.close()
    run_dir = tmp_path / "c"
    before, config = snapshot(run_dir / "checkpoints"), (run_dir / "config.yaml").read_text()
    res = run_cli([*SMALL, f"run.dir={run_dir}", "objective.alpha=0.5"])
    assert_one_error_line(res, "objective.alpha", "step_00000001", "run.allow_config_change")
    assert snapshot(run_dir / "checkpoints") == before
    assert (run_dir / "config.yaml").read_text() == config


# -- corrupt inputs -------------------------------------------------------------------------------
def test_truncated_checkpoint_shard_is_an_error_naming_the_checkpoint(dist1, tmp_path):
    tr = make_trainer(tmp_path, name="k")
    tr.step = 2
    tr.save()
    tr.close()
    step_dir = tmp_path / "k" / "checkpoints" / "step_00000002"
    shards = sorted(step_dir.glob("*.distcp"))
    assert shards, f"no *.distcp in {step_dir}: {sorted(p.name for p in step_dir.iterdir())}"
    with open(shards[-1], "r+b") as f:
        f.truncate(os.path.getsize(shards[-1]) // 2)
    before = snapshot(tmp_path / "k" / "checkpoints")
    res = run_cli([*SMALL, f"run.dir={tmp_path / 'k'}"])
    assert snapshot(tmp_path / "k" / "checkpoints") == before, "a failed resume changed or deleted checkpoint files"
    # (torch's CheckpointException is a BaseException: an `except Exception` would let it through)
    assert_one_error_line(res, "could not load checkpoint", step_dir)


def test_unreadable_commit_marker_is_a_checkpoint_error(dist1, tmp_path):
    """An unreadable marker is an input error (one line, exit 2), not a JSONDecodeError traceback."""
    tr = make_trainer(tmp_path, name="m")
    tr.step = 1
    tr.save()
    tr.close()
    marker = tmp_path / "m" / "checkpoints" / "step_00000001" / "nld_checkpoint.json"
    marker.write_text("")  # e.g. after a power loss: _commit writes the marker without fsync
    from nld_train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="step_00000001"):
        make_trainer(tmp_path, name="m")


def test_data_bin_not_matching_idx_is_an_error_naming_the_file(tmp_path):
    from nld_train.data.demo_corpus import ensure_demo_corpus
    src = ensure_demo_corpus()
    prefix = tmp_path / "data" / Path(src).name
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(src + suffix, str(prefix) + suffix)
    with open(str(prefix) + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(str(prefix) + ".bin") - 2)
    before = snapshot(prefix.parent)
    res = run_cli(["recipe=smoke", f"data.path={prefix}", f"run.dir={tmp_path / 'run'}"])
    assert_one_error_line(res, f"{prefix}.bin", "corrupt or incomplete")
    assert snapshot(prefix.parent) == before, "the data files were modified"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocabulary(dist1, tmp_path):
    from nld_train.errors import InputError  # what the CLI prints as one line with exit code 2
    with pytest.raises(InputError, match=r"tokenizer .* has 8192 tokens but model\.vocab_size is 4096"):
        make_trainer(tmp_path, "model.vocab_size=4096")


def test_tensor_parallel_size_not_dividing_the_model():
    with pytest.raises(ConfigError, match=r"parallel\.tensor_model_parallel_size: 2 does not divide "
                                          r"model\.num_query_groups=1"):
        load_config(["recipe=smoke", "parallel.tensor_model_parallel_size=2", "model.num_query_groups=1"],
                    world_size=2)


# -- async saves and retention --------------------------------------------------------------------
def test_async_save_reproduces_the_golden_curve(dist1, tmp_path):
    """The smoke recipe with checkpoint.async_save=true: the golden losses (as
    test_cli.py::test_golden_loss_curve) and the checkpoints a sync run commits."""
    run_dir = tmp_path / "async"
    fit(smoke_trainer(run_dir, "checkpoint.async_save=true"))
    golden = json.loads(GOLDEN.read_text())
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "loss_ar", "loss_diff", "grad_norm", "lr"):
        for g, r in zip(golden[key], rows, strict=True):
            assert r[key] == pytest.approx(g, rel=2e-4, abs=1e-6), (key, r["step"])
    assert step_dirs(run_dir) == ["step_00000009", "step_00000012"]  # keep_last=2, as the sync CLI run
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000012\n"


def test_keep_last_and_keep_every_sync_and_async_commit_the_same(dist1, tmp_path):
    args = ["train.max_steps=12", "checkpoint.interval=2", "checkpoint.keep_last=1", "checkpoint.keep_every=4"]
    fit(make_trainer(tmp_path, *args, name="sync"))
    fit(make_trainer(tmp_path, *args, "checkpoint.async_save=true", name="async"))
    kept = ["step_00000004", "step_00000008", "step_00000012"]
    for mode in ("sync", "async"):
        assert step_dirs(tmp_path / mode) == kept, mode
        assert (tmp_path / mode / "checkpoints" / "latest").read_text() == "step_00000012\n", mode
    sync_rows, async_rows = metrics(tmp_path / "sync"), metrics(tmp_path / "async")
    assert [r["step"] for r in async_rows] == [r["step"] for r in sync_rows] == list(range(1, 13))
    for a, b in zip(async_rows, sync_rows, strict=True):
        for key in ("loss", "loss_ar", "loss_diff", "grad_norm", "lr", "skipped_steps"):
            assert a[key] == b[key], f"step {a['step']}: {key} async {a[key]!r} != sync {b[key]!r}"
    for name in kept:
        a, s = tmp_path / "async" / "checkpoints" / name, tmp_path / "sync" / "checkpoints" / name
        # the tensors, megatron's common state and the RNG states: byte for byte
        files = sorted(str(p.relative_to(s)) for p in s.rglob("*") if p.is_file() and p.suffix in (".distcp", ".pt"))
        assert any(f.endswith(".distcp") for f in files) and any(f.startswith("rng") for f in files), files
        for rel in files:
            assert (a / rel).read_bytes() == (s / rel).read_bytes(), f"{name}/{rel} differs between async and sync"
        ma, ms = (json.loads((d / "nld_checkpoint.json").read_text()) for d in (a, s))
        for m in (ma, ms):
            m["config"]["checkpoint"].pop("async_save"), m["config"]["run"].pop("dir")
        assert ma == ms, name
