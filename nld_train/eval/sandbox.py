"""Running generated code (HumanEval, MBPP) in a subprocess jail.

What a run gets (see docs/evaluation.md, "Sandbox", for the threat model):
- its own unprivileged uid/gid when the evaluator is root: a number no other process uses
  (no supplementary groups), so it can write nowhere root or any user owns, and everything it
  started can be found and killed by uid afterwards (``kill(-1)`` from a process of that uid);
- a new network namespace (no interface but a down loopback) and, when root, a mount namespace
  with private size-limited tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock; its working dir is a
  fresh tmpfs folder;
- rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
- a wall-clock timeout after which its process group and (root) every process of its uid is
  killed; stdout/stderr go to files (capped by the file-size limit), the tail is kept.

As a non-root user there is no uid switch: the program runs as the evaluator's user in a new user
+ network namespace (where the kernel allows unprivileged user namespaces) with the same rlimits.
What was in force is reported per run (:class:`ExecResult`) and in results.json (``sandbox``).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAUNCHER = str(Path(__file__).with_name("_sandbox_child.py"))
UID_BASE = 1_900_000_000          # far above any uid a system assigns; one uid per run
_counter = itertools.count()
_lock = threading.Lock()


class SandboxError(RuntimeError):
    """The jail itself could not be set up (not a verdict on the program)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 20.0       # wall clock (MBPP task 123 alone takes ~5 s on a busy CPU)
    cpu_s: int = 20               # RLIMIT_CPU
    memory_mb: int = 1024         # RLIMIT_AS
    nproc: int = 32               # RLIMIT_NPROC (processes + threads of the run's uid)
    file_mb: int = 16             # RLIMIT_FSIZE (also caps stdout/stderr)
    nofile: int = 64              # RLIMIT_NOFILE
    tmpfs_mb: int = 64            # size of each private tmpfs (root only)


@dataclass
class ExecResult:
    status: str                   # "passed" (exit 0) | "failed" (non-zero exit or signal) | "timeout" (wall or CPU)
    returncode: int
    seconds: float
    stdout: str = ""              # last 2000 characters
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _next_uid() -> int:
    with _lock:
        n = next(_counter)
    return UID_BASE + ((os.getpid() & 0xFFFFF) << 10 | (n & 0x3FF))


def _world_executable(path: str) -> bool:
    """Whether a user with no relation to the file's owner may execute ``path`` (every folder on
    the way searchable by others, the file executable by others)."""
    p = Path(os.path.realpath(path))
    try:
        if not p.is_file() or not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


_PYTHON = None


def sandbox_python() -> str:
    """The interpreter that runs the programs. As root it must be usable by an unprivileged uid;
    a venv or pyenv under /root is not, so a system interpreter of the same minor version (the
    programs need only the standard library) is taken. ``NLD_SANDBOX_PYTHON`` overrides."""
    global _PYTHON
    if _PYTHON is not None:
        return _PYTHON
    if os.environ.get("NLD_SANDBOX_PYTHON"):
        cands = [os.environ["NLD_SANDBOX_PYTHON"]]
    elif os.geteuid() != 0:
        cands = [sys.executable]
    else:
        v = f"{sys.version_info.major}.{sys.version_info.minor}"
        cands = [getattr(sys, "_base_executable", sys.executable), sys.executable,
                 f"/usr/bin/python{v}", f"/usr/local/bin/python{v}"]
    for c in cands:
        if c and (os.geteuid() != 0 or _world_executable(c)):
            _PYTHON = os.path.realpath(c) if os.geteuid() == 0 else c
            return _PYTHON
    raise SandboxError(f"no Python interpreter usable by an unprivileged user among {cands} (a folder on the "
                       "way is not searchable by others, e.g. /root); install a system python3 or set "
                       "NLD_SANDBOX_PYTHON=<interpreter>")


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid``: a helper with that uid sends SIGKILL to all it may signal
    (= the processes of its uid, not itself), until none is left."""
    code = ("import os, signal\n"
            "for _ in range(1000):\n"
            "    try:\n        os.kill(-1, signal.SIGKILL)\n"
            "    except ProcessLookupError:\n        break\n")
    subprocess.run([sandbox_python(), "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30, check=False)


def _tail(path: Path, n: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run ``program`` (Python source) in the jail; passed = exit status 0 within the limits."""
    root = os.geteuid() == 0
    uid = _next_uid() if root else os.getuid()
    gid = uid if root else os.getgid()
    tmp = Path(tempfile.mkdtemp(prefix="nld-sandbox-"))   # 0700, the evaluator's
    work = tmp / "work"            # the program's folder when no private tmpfs can be mounted
    work.mkdir(mode=0o700)
    (work / "program.py").write_text(program)
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    status_r, status_w = os.pipe()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cfg = dict(program=str(work / "program.py"), uid=uid, gid=gid, status_fd=status_w, parent_pid=os.getpid(),
               python=sandbox_python(), env=env, limits=asdict(limits), tmpfs_mb=limits.tmpfs_mb)
    t0 = time.perf_counter()
    timed_out = False
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(status_w,),
                                    start_new_session=True)
            os.close(status_w)
            status_w = -1
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - t0
        with os.fdopen(status_r, "r") as f:
            status_r = -1
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        report = json.loads(lines[-1]) if lines else {}
        # with a PID namespace the kernel killed everything in it when its init exited; without
        # one, a process that left the process group (setsid) is found by its uid
        if root and not report.get("pid_namespace"):
            _kill_uid(uid)
        if not report.get("ok"):
            raise SandboxError(f"sandbox setup failed: {report.get('error') or _tail(err_path)}")
        report.pop("ok")
        # the CPU limit (SIGXCPU: -24 directly, 128 + 24 through the PID namespace's init) is a timeout
        cpu_out = proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
        status = "timeout" if timed_out or cpu_out else ("passed" if proc.returncode == 0 else "failed")
        return ExecResult(status, proc.returncode, seconds, _tail(out_path), _tail(err_path), report)
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


_ISOLATION = None


def isolation() -> dict:
    """What the jail provides on this machine (probed once with a trivial program)."""
    global _ISOLATION
    if _ISOLATION is None:
        res = run_python("pass\n", SandboxLimits(timeout_s=30))
        if not res.passed:
            raise SandboxError(f"the sandbox cannot run a trivial program: {res.status}, {res.stderr[-500:]}")
        _ISOLATION = dict(res.isolation, own_uid=os.geteuid() == 0, python=sandbox_python())
    return dict(_ISOLATION)
