"""The code sandbox holds: hostile programs are contained, honest ones pass, nothing is left behind.

The strongest checks (own uid, private /tmp, network and PID namespaces) need root, as on CI; as a
non-root user only what the jail then promises is checked (see docs/evaluation.md).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nld_train.eval.sandbox import SandboxLimits, isolation, run_python
from tests.conftest import proc_stats

FAST = SandboxLimits(timeout_s=3, cpu_s=3, memory_mb=512)
ROOT = os.geteuid() == 0


def _uid_procs(uid):
    out = subprocess.run(["ps", "-o", "pid=", "-u", str(uid)], capture_output=True, text=True).stdout
    return out.split()


def test_honest_programs_pass_and_failures_fail():
    ok = run_python("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\nprint('fine')\n", FAST)
    assert ok.passed and "fine" in ok.stdout
    bad = run_python("assert 1 + 1 == 3\n", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_python("def broken(:\n", FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_is_killed_at_the_limits():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", FAST)
    assert r.status == "timeout"
    assert time.perf_counter() - t0 < 15
    sleeper = run_python("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1.5))
    assert sleeper.status == "timeout" and sleeper.seconds < 10


def test_huge_allocation_fails_inside():
    r = run_python("x = bytearray(8 << 30)\nprint('allocated')\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_fork_bomb_is_contained_and_nothing_survives():
    prog = ("import os, time\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()\n"            # try to leave the process group
            "            time.sleep(120)\n"
            "            os._exit(0)\n"
            "    except OSError:\n"
            "        print('fork refused')\n"
            "        break\n"
            "print('parent exits')\n")
    r = run_python(prog, FAST)
    assert "fork refused" in r.stdout          # RLIMIT_NPROC stops it
    if ROOT:
        assert _uid_procs(r.isolation["uid"]) == []   # sleeping children killed with the run


def test_writes_outside_the_work_dir_fail_or_stay_private(tmp_path):
    """os and subprocess may not write into the evaluator's folders; /tmp writes are private."""
    target = tmp_path / "owned_by_the_evaluator"
    target.mkdir()
    tag = uuid.uuid4().hex
    prog = (f"import os, subprocess\n"
            f"open('/tmp/escape_{tag}', 'w').write('x')\n"
            f"for path in ['{target}/a', '{Path.cwd()}/escape_{tag}', '{Path.home()}/escape_{tag}']:\n"
            f"    try:\n"
            f"        fd = os.open(path, os.O_WRONLY | os.O_CREAT)\n"
            f"        print('WROTE', path)\n"
            f"    except OSError as e:\n"
            f"        print('denied', path, e.errno)\n"
            f"subprocess.run(['sh', '-c', 'echo x > {target}/b; echo x > /tmp/sub_{tag}'])\n"
            f"open('local_file', 'w').write('inside the work dir is fine')\n")
    r = run_python(prog, FAST)
    assert r.passed, r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("denied") == 3
    assert list(target.iterdir()) == []
    assert not (Path.cwd() / f"escape_{tag}").exists() and not (Path.home() / f"escape_{tag}").exists()
    if ROOT:  # a private tmpfs: the evaluator's /tmp never sees the files
        assert not Path(f"/tmp/escape_{tag}").exists() and not Path(f"/tmp/sub_{tag}").exists()
    else:
        for p in (f"/tmp/escape_{tag}", f"/tmp/sub_{tag}"):
            Path(p).unlink(missing_ok=True)


@pytest.mark.skipif(not ROOT, reason="the network and PID namespaces, uid switch need root")
def test_root_isolation_network_and_processes():
    info = isolation()
    assert info["network_isolated"] and info["private_tmp"] and info["pid_namespace"] and info["own_uid"]
    r = run_python("import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=3)\n", FAST)
    assert r.status == "failed" and "unreachable" in r.stderr.lower()
    r = run_python("import os\nprint(os.getuid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n", FAST)
    uid, procs = r.stdout.split(" ", 1)
    assert int(uid) == r.isolation["uid"] != 0 and procs.strip() == "[1, 2]"   # its init and itself
    if Path("/etc/shadow").exists():   # root-only files stay closed
        r = run_python("print(open('/etc/shadow').read())\n", FAST)
        assert r.status == "failed" and "PermissionError" in r.stderr


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 4096)\n", FAST)
    assert not r.passed and len(r.stdout) <= 2000


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, f in proc_stats().items():
        children.setdefault(int(f[1]), []).append(child)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def test_a_killed_evaluator_takes_the_sandboxed_program_with_it():
    """SIGKILL to the evaluator while a program sleeps in the jail (no CPU time: RLIMIT_CPU never
    fires, the evaluator's timeout is gone with it): launcher and program exit within seconds."""
    code = ("from nld_train.eval.sandbox import SandboxLimits, run_python\n"
            "run_python('import time\\ntime.sleep(300)\\n', SandboxLimits(timeout_s=300))\n")
    evaluator = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    scratch = None
    try:
        deadline = time.time() + 60
        while not any(_cmdline(p).endswith("\0-s\0program.py\0") for p in _descendants(evaluator.pid)):
            assert evaluator.poll() is None and time.time() < deadline, "the sandboxed program never started"
            time.sleep(0.05)
        jailed = _descendants(evaluator.pid)
        for p in jailed:  # the run's temporary folder, which the killed evaluator cannot remove
            args = _cmdline(p).split("\0")
            if len(args) > 4 and args[3].endswith("_sandbox_child.py"):
                scratch = Path(json.loads(args[4])["program"]).parents[1]
        os.kill(evaluator.pid, signal.SIGKILL)
        evaluator.wait()
        deadline = time.time() + 10
        while (left := [p for p in jailed if _alive(p)]) and time.time() < deadline:
            time.sleep(0.05)
        assert not left, f"still running after the evaluator was killed: {left}"
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.wait()
        if scratch is not None and scratch.name.startswith("nld-sandbox-"):
            shutil.rmtree(scratch, ignore_errors=True)
