"""slurm/*.sbatch against a real Slurm (scripts/local-slurm: slurmctld + slurmd + munge on this
machine, 2 fake GPUs, CPU ranks on gloo).

One private cluster per test module (own state dir and ports, so concurrent test runs do not share
or stop each other's cluster). The first start installs the Debian packages (needs root and apt).
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.slow
LOCAL_SLURM = REPO / "scripts" / "local-slurm"


def _free_ports(n: int) -> int:
    """A base port p with p .. p+n-1 free (slurmctld on p, the node's slurmd on p+1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (true in the dev and CI containers)")
    state = Path(f"/tmp/nld-slurm-test-{os.getpid()}")
    env = child_env({"LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_PORT": str(_free_ports(2)),
                     "LOCAL_SLURM_GPUS": "2", "OMP_NUM_THREADS": "1",
                     # the jobs run this interpreter (the venv the tests run in)
                     "NLD_PYTHON": sys.executable})
    t0 = time.time()
    start = subprocess.run([str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    print(f"local-slurm start: {time.time() - t0:.1f}s")
    out = subprocess.run([str(LOCAL_SLURM), "env"], env=env, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, value = shlex.split(line.removeprefix("export "))[0].split("=", 1)
        env[key] = value
    yield env
    stop = subprocess.run([str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)
    if stop.returncode == 0:
        shutil.rmtree(state, ignore_errors=True)  # our own state dir (config, spool, logs)


def sbatch(env, workdir, script, *args, sbatch_opts=(), extra_env=None) -> str:
    e = {**env, "NLD_MASTER_PORT": str(_free_ports(1)), **(extra_env or {})}
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={workdir}", *sbatch_opts, str(REPO / script), *args],
                         cwd=REPO, env=e, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait(env, jid, timeout=240):
    done = subprocess.run([str(LOCAL_SLURM), "wait", jid, str(timeout)], env=env, capture_output=True,
                          text=True, timeout=timeout + 30)
    return done.returncode, done.stdout + done.stderr


def metric_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()]


def assert_checkpoint(run_dir: Path, step: int):
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{step:08d}"
    for name in ("nld_checkpoint.json", "metadata.json"):
        assert (ckpts / f"step_{step:08d}" / name).is_file(), name


def test_train_sbatch_completes_srun_launcher(slurm, tmp_path):
    """--ntasks-per-node=<GPUs per node> (Megatron-LM's habit) with the default launcher: one task
    per rank started by srun. Metrics, checkpoint, per-rank logs in run.dir/logs (not the submit
    directory), and the Hydra overrides arrive unchanged."""
    run = tmp_path / "run"
    jid = sbatch(slurm, tmp_path, "slurm/train.sbatch", "recipe=smoke", f"run.dir={run}", "train.max_steps=4",
                 "objective.alpha=0.25", "wandb.name=a b", sbatch_opts=["--gpus-per-node=2", "--ntasks-per-node=2"])
    rc, out = wait(slurm, jid)
    assert rc == 0, out
    assert metric_steps(run) == [1, 2, 3, 4]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 and r["tokens"] == r["step"] * 8 * 64 for r in rows)
    assert_checkpoint(run, 4)
    cfg = (run / "config.yaml").read_text()
    assert "alpha: 0.25" in cfg and "name: a b" in cfg
    logs = run / "logs" / f"nld-train-{jid}"
    assert "world=2" in (logs / "rank-0.out").read_text()
    assert (logs / "rank-1.out").exists()
    batch_log = (tmp_path / f"nld-train-{jid}.out").read_text()
    assert "2 tasks per node, 2 GPUs per node: one rank per task (NLD_LAUNCHER=srun)" in batch_log
    assert "launcher=srun world=2" in batch_log and f"logs={logs}" in batch_log
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"nld-train-{jid}.out", "run"]  # nothing else here


@pytest.mark.parametrize("opts, env, needle", [
    (["--gpus-per-node=2", "--ntasks-per-node=3"], {},
     ("error: 3 tasks per node but 2 GPUs per node: submit with --ntasks-per-node=1 (torchrun starts one rank per GPU)"
      " or --ntasks-per-node=2 (one task per GPU)")),
    (["--gpus-per-node=2", "--ntasks-per-node=2"], {"NLD_LAUNCHER": "torchrun"},
     "error: NLD_LAUNCHER=torchrun runs one task per node"),
    (["--gpus-per-node=2"], {"NLD_NPROC_PER_NODE": "3"},
     "error: NLD_NPROC_PER_NODE=3 ranks per node but 2 GPUs per node"),
])
def test_train_sbatch_refuses_tasks_that_do_not_fit_the_gpus(slurm, tmp_path, opts, env, needle):
    """Tasks per node that the launcher cannot map one rank per GPU: one line before launch."""
    run = tmp_path / "run"
    jid = sbatch(slurm, tmp_path, "slurm/train.sbatch", "recipe=smoke", f"run.dir={run}", sbatch_opts=opts,
                 extra_env=env)
    rc, out = wait(slurm, jid, timeout=60)
    assert rc != 0, out
    log = (tmp_path / f"nld-train-{jid}.out").read_text()
    errors = [ln for ln in log.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], log
    assert "launcher=" not in log and not run.exists() and not (tmp_path / "logs").exists()


def test_train_sbatch_configuration_error_before_launch(slurm, tmp_path):
    """The run dir (for the logs) comes from nld-train's own composition: a wrong key stops the job
    at once with nld-train's message in the batch log."""
    jid = sbatch(slurm, tmp_path, "slurm/train.sbatch", "recipe=smoke", "train.nope=1",
                 sbatch_opts=["--gpus-per-node=2"])
    rc, out = wait(slurm, jid, timeout=60)
    assert rc != 0, out
    log = (tmp_path / f"nld-train-{jid}.out").read_text()
    assert "Key 'nope' not in 'TrainConfig'" in log and "could not compose its configuration" in log, log
    assert "launcher=" not in log and sorted(p.name for p in tmp_path.iterdir()) == [f"nld-train-{jid}.out"]


def test_train_sbatch_preempt_requeue_resume(slurm, tmp_path):
    """USR1 to the batch shell -> SIGTERM to torchrun -> checkpoint, exit 75 (torchrun: 1) ->
    scontrol requeue -> the second run resumes and finishes; every step is trained exactly once.
    The AdamW state is sharded over the two ranks (parallel.distributed_optimizer), so the
    preemption checkpoint carries it in halves."""
    # 40 steps: on an idle machine a 10-step smoke run once finished all its steps between the 2nd
    # step's metrics line and the SIGTERM reaching it (checkpoint at step 10 of 10)
    run, max_steps = tmp_path / "run", 40
    jid = sbatch(slurm, tmp_path, "slurm/train.sbatch", "recipe=smoke", f"run.dir={run}",
                 f"train.max_steps={max_steps}", "checkpoint.interval=0", "parallel.distributed_optimizer=true",
                 sbatch_opts=["--gpus-per-node=2"], extra_env={"NLD_LOG_DIR": str(tmp_path / "joblogs")})
    deadline = time.time() + 180
    while len(metric_steps(run)) < 2:  # training is under way
        assert time.time() < deadline, "no training steps within 180 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm, check=True)
    rc, out = wait(slurm, jid, timeout=300)
    assert rc == 0, out
    batch_log = (tmp_path / f"nld-train-{jid}.out").read_text()
    assert "preempted: requeueing job" in batch_log and "requeue failed" not in batch_log
    assert f"job {jid} restart 1]" in batch_log  # the same job ran again (SLURM_RESTART_COUNT=1)
    node_log = (tmp_path / "joblogs" / f"nld-train-{jid}" / "node-0.out").read_text()  # NLD_LOG_DIR
    m = re.search(r"preempted \(SIGTERM\): checkpoint at step (\d+) committed, exiting with code 75", node_log)
    assert m, node_log[-3000:]
    k = int(m.group(1))
    assert 2 <= k < max_steps
    assert "optimizer state sharded over dp" in node_log
    assert f"resumed from {run}/checkpoints/step_{k:08d} at step {k}" in node_log
    # progress lines of both runs (log_interval 1): each step trained once, none repeated or lost
    trained = [int(s) for s in re.findall(rf"\[default0\]:step (\d+)/{max_steps} ", node_log)]
    assert trained == list(range(1, max_steps + 1))
    assert metric_steps(run) == list(range(1, max_steps + 1))
    assert_checkpoint(run, max_steps)
    assert (run / "checkpoints" / f"step_{k:08d}").is_dir()  # the preemption checkpoint (keep_last 2)


def test_train_sbatch_names_a_python_without_nld_train(slurm, tmp_path):
    """A Python that cannot import nld_train stops the job before launch, with the fix named."""
    jid = sbatch(slurm, tmp_path, "slurm/train.sbatch", "recipe=smoke", f"run.dir={tmp_path / 'run'}",
                 sbatch_opts=["--gpus-per-node=2"], extra_env={"NLD_PYTHON": "/nonexistent/python"})
    rc, out = wait(slurm, jid, timeout=60)
    assert rc != 0
    log = (tmp_path / f"nld-train-{jid}.out").read_text()
    assert "NLD_PYTHON=/nonexistent/python (not found) cannot import nld_train" in log, log
    assert "source .venv/bin/activate" in log and "launcher=" not in log
    assert not (tmp_path / "run").exists()


def test_convert_sbatch_container_flags_and_args(slurm, tmp_path):
    """NLD_CONTAINER_IMAGE adds the pyxis flags to srun (a stand-in srun records and drops them,
    as local Slurm has no pyxis); arguments reach the command unchanged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_srun = subprocess.run(["bash", "-c", "command -v srun"], env=slurm, capture_output=True,
                               text=True, check=True).stdout.strip()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nargs=()\nfor a in \"$@\"; do case $a in --container-*) echo \"$a\" >>\"$SRUN_CONTAINER_LOG\" ;;"
        f" *) args+=(\"$a\") ;; esac; done\nexec {real_srun} \"${{args[@]}}\"\n")
    (bin_dir / "fake-convert").write_text("#!/bin/bash\nprintf 'ARG<%s>\\n' \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{slurm['PATH']}", "SRUN_CONTAINER_LOG": str(tmp_path / "container.log"),
           "NLD_CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3", "NLD_CONTAINER_MOUNTS": "/data:/data",
           "NLD_CONVERT": str(bin_dir / "fake-convert")}
    jid = sbatch(slurm, tmp_path, "slurm/convert.sbatch", "to-hf", "runs/a b", "out dir", "--tp", "2",
                 extra_env=env)
    rc, out = wait(slurm, jid, timeout=60)
    assert rc == 0, out
    log = (tmp_path / f"nld-convert-{jid}.out").read_text()
    assert re.findall(r"ARG<(.*)>", log) == ["to-hf", "runs/a b", "out dir", "--tp", "2"]
    assert (tmp_path / "container.log").read_text().splitlines() == [
        "--container-image=nvcr.io#nvidia/pytorch:25.01-py3", "--container-mounts=/data:/data",
        f"--container-workdir={tmp_path}"]
