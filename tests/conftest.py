"""Shared test setup: offline hubs, quiet wandb, a 1-process gloo group for in-process model tests."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

_TMP = tempfile.mkdtemp(prefix="nld-tests-")
for k, v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                 HF_HOME=f"{_TMP}/hf", WANDB_MODE="disabled", WANDB_SILENT="true", WANDB_DIR=_TMP,
                 WANDB_CACHE_DIR=_TMP, WANDB_CONFIG_DIR=_TMP, TOKENIZERS_PARALLELISM="false",
                 MKL_CBWR="AUTO,STRICT").items():  # as nld-train's CLI sets it: alignment-independent MKL
    os.environ.setdefault(k, v)
# one demo-corpus cache for the whole session (and for the CLI subprocesses the tests start)
os.environ.setdefault("NLD_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nld-test-cache"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dist1():
    """A 1-process gloo group with megatron parallel state (TP=1), shared by in-process tests."""
    from nld_train.dist import init_distributed
    return init_distributed(1, seed=1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads; on a shared CPU extra threads only oversubscribe it."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def child_env(extra=None) -> dict:
    """os.environ for a CLI subprocess, without rendezvous variables. The product no longer needs
    this (a 1-process group binds no port and writes nothing to os.environ; a stale RANK=0
    WORLD_SIZE=1 MASTER_* is ignored, tests/test_launch.py): it only keeps a shell's exported
    WORLD_SIZE > 1 from turning a test's one-process command into a rank of a rendezvous."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(extra or {})
    return e


def run_group(cmd, timeout, **kw):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` in a new session: on a
    timeout (or an interrupted test run) the whole process group is killed, torchrun's workers too,
    so no orphaned gloo workers outlive the test."""
    import signal
    import subprocess
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(args, env=None, timeout=600, nproc=None):
    """Run `nld-train` (or torchrun of it) in a subprocess; returns CompletedProcess."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "nld_train.cli"] if nproc else [sys.executable, "-m", "nld_train.cli"]) + list(args)
    return run_group(cmd, timeout, cwd=REPO, env=child_env(env))
