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


def _selects_cuda_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects tests marked ``cuda`` (``-m cuda``, ``-m "cuda or slow"``)."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression
        return bool(Expression.compile(markexpr).evaluate(lambda name, **_: name == "cuda"))
    except Exception:   # private pytest API: a plain reading if it ever changes
        return "cuda" in markexpr and "not cuda" not in markexpr


def pytest_configure(config):
    """The device of this session. The suite is written for the CPU (gloo, fp32, golden numbers of
    CPU runs): on a machine with a GPU, ``build_model`` would put the model on CUDA while a test's
    tensors stay on the CPU, and fp32 CPU goldens would be compared with bf16 CUDA runs. So unless
    ``-m`` selects the ``cuda`` tests, the GPUs are hidden from this process and every CLI child
    (CUDA_VISIBLE_DEVICES is inherited) before anything initialises CUDA: the CPU suite runs
    exactly as in CI on any machine. ``pytest -m cuda`` keeps the GPUs and runs the tests marked
    ``cuda`` (tests/test_cuda.py), which use the ``device`` fixture. NLD_TEST_KEEP_CUDA=1 keeps
    them for a whole-suite run on purpose."""
    if not (_selects_cuda_tests(config.getoption("markexpr", "")) or os.environ.get("NLD_TEST_KEEP_CUDA") == "1"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    why = ("no CUDA device" if os.environ.get("CUDA_VISIBLE_DEVICES") != ""
           else "GPUs hidden for the CPU suite: run `pytest -m cuda`")
    skip = pytest.mark.skip(reason=f"cuda test: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """The device tensors of a test belong on: the one build_model puts the model on."""
    from nld_train.dist import capabilities
    return capabilities().device


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


def proc_stats() -> dict:
    """pid -> the fields of /proc/<pid>/stat after "pid (comm) " (state, ppid, pgrp, ...), for the
    tests that look for processes a killed command left behind (Linux)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = stat[stat.rindex(")") + 2:].split()
    return out
