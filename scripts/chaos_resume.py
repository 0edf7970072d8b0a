#!/usr/bin/env python
"""Chaos test of resuming: SIGKILL `nld-train` at random moments, restart it unchanged, and check
that the finished run equals an uninterrupted one bit for bit.

    python scripts/chaos_resume.py [--trials N] [--steps S] [--interval I] [--seed X] [--keep]
                                   [--async-save] [--set key=value ...]

One reference run (recipe=smoke, S steps, a checkpoint every I steps) is trained without
interruption. Then each trial starts the same command in a fresh run dir and kills it with SIGKILL
(the whole process group, like a node failure) 1 to 3 times before letting it finish. A kill
happens either after a delay drawn uniformly from [0, wall time of the reference run] (so during
start-up, data-index building, training steps or saves), or, biased, right after a `tmp.step_*`
folder (a save in progress) appears. Every random draw comes from one RNG seeded with --seed.

A trial is identical when the final run exits 0, metrics.jsonl holds every step 1..S exactly
once with loss, loss_ar, loss_diff, grad_norm, lr and skipped_steps equal to the reference bit for
bit, and checkpoints/ holds the same complete step folders as the reference, `latest` naming the
last one. Left-over `tmp.*`/`trash.*` folders (a kill during a save or a prune; the next commit
deletes them) are noted, not counted. Prints one line per trial and `k/N identical`; exit
code 0 only if all trials are identical. No process is left behind (each run is its own process
group, killed and reaped before the script returns). Set NLD_CACHE_DIR to reuse a demo corpus.

Which guarantee holds where (docs/checkpointing.md): on CPU resume is bit-exact, and that is what
the default --rtol 0 checks. On CUDA it is bit-exact only with `--set train.deterministic=true`
(deterministic kernels, same GPU model, software and layout); without it cuBLAS/attention
kernels may reorder sums between runs, so the script refuses --rtol 0 there and compares within
--rtol (relative, per value; skipped_steps always exactly) if one is given.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "loss_ar", "loss_diff", "grad_norm", "lr", "skipped_steps")
POLL_S = 0.002
RUN_TIMEOUT_S = 600
LEFTOVER_GRACE_S = 5.0

_live: dict[int, subprocess.Popen] = {}  # pid (= process group id) -> Popen, until reaped
_groups: set[int] = set()                # every process group we started, for the final check


# -- processes ------------------------------------------------------------------------------------
def start(overrides: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "a") as log:
        log.write(f"\n=== start {time.strftime('%H:%M:%S')}: nld-train {' '.join(overrides)}\n")
        log.flush()
        p = subprocess.Popen([sys.executable, "-m", "nld_train.cli", *overrides], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _live[p.pid] = p
    _groups.add(p.pid)
    return p


def exited(p: subprocess.Popen) -> bool:
    """True once the process has exited, without reaping it: an unreaped leader keeps its
    process-group id reserved, so killing the group afterwards cannot hit a stranger."""
    if p.returncode is not None:
        return True
    return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def reap(p: subprocess.Popen) -> list[int]:
    """SIGKILL the whole process group of `p` (leader first if still alive) and reap the leader.
    Returns the pids of group members other than the leader that were still alive (leftovers)."""
    leftovers = []
    if p.returncode is None:
        if exited(p):  # a normal exit: helpers (multiprocessing manager, resource tracker) get a moment
            grace = time.monotonic() + LEFTOVER_GRACE_S
            while (leftovers := [pid for pid in group_members(p.pid) if pid != p.pid]) and time.monotonic() < grace:
                time.sleep(0.05)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    _live.pop(p.pid, None)
    return leftovers


def kill_all() -> None:
    for p in list(_live.values()):
        reap(p)


# -- run dirs -------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(run_dir: Path) -> int:
    """Last step in metrics.jsonl (tolerates a line being written right now)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return -1


def complete_steps(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name.startswith("step_") and (p / "nld_checkpoint.json").is_file())


def saving(run_dir: Path, since: float = 0.0) -> str | None:
    """The newest tmp.step_* folder (a save in progress) created at or after `since` (time.time())."""
    root = run_dir / "checkpoints"
    names = []
    try:
        for e in os.scandir(root):
            if e.name.startswith("tmp.step_"):
                try:
                    if e.stat().st_ctime >= since:
                        names.append(e.name)
                except FileNotFoundError:  # committed (renamed) meanwhile
                    pass
    except OSError:
        return None
    return max(names) if names else None


def checkpoint_state(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    other = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return {"complete": complete_steps(run_dir), "latest": latest,
            "other": [n for n in other if n != "latest" and n not in complete_steps(run_dir)]}


def _same(a, b, rtol: float) -> bool:
    if rtol == 0 or not isinstance(a, float) or not isinstance(b, float):
        return a == b
    return abs(a - b) <= rtol * abs(b)


def compare(rows: list[dict], ref: list[dict], rtol: float = 0.0) -> str | None:
    """None if identical (within ``rtol`` for float values), else the missing/duplicate steps or
    the first differing values."""
    steps = [r.get("step") for r in rows]
    want = [r["step"] for r in ref]
    if steps != want:
        dup = sorted({s for s in steps if steps.count(s) > 1})
        missing = sorted(set(want) - set(steps))
        return f"steps {steps} (duplicates {dup}, missing {missing})"
    diffs = [f"step {a['step']} {k} {a.get(k)!r} != {b.get(k)!r}"
             for a, b in zip(rows, ref, strict=True) for k in COMPARED
             if not _same(a.get(k), b.get(k), 0.0 if k == "skipped_steps" else rtol)]
    if diffs:
        return "; ".join(diffs[:4]) + (f"; ... ({len(diffs)} values)" if len(diffs) > 4 else "")
    return None


# -- one trial ------------------------------------------------------------------------------------
def plan_kill(rng: random.Random, ref_wall: float, steps: int, interval: int, resumed: int, save_bias: float):
    """('uniform', delay) or ('save', step, extra_delay): kill when tmp.step_<step> appears."""
    saves = [s for s in range(interval, steps + 1, interval) if s > resumed] or [steps]
    if steps not in saves and steps > resumed:
        saves.append(steps)  # the final save (checkpoint.save_final)
    if rng.random() < save_bias:
        return ("save", rng.choice(saves), rng.uniform(0.0, 0.15))
    return ("uniform", rng.uniform(0.0, ref_wall))


def run_until_kill(p: subprocess.Popen, run_dir: Path, plan, started: float) -> str:
    """Wait for the planned moment, then SIGKILL the process group. `started` is the time.time()
    just before the process started: tmp folders older than that are left-overs of a killed run."""
    t0 = time.monotonic()
    deadline = t0 + RUN_TIMEOUT_S
    if plan[0] == "uniform":
        due = t0 + plan[1]
        while time.monotonic() < due and not exited(p):
            time.sleep(POLL_S)
    else:
        target = f"tmp.step_{plan[1]:08d}"
        due = None
        while not exited(p) and time.monotonic() < deadline:
            now = time.monotonic()
            if due is None and saving(run_dir, started) == target:
                due = now + plan[2]
            if due is not None and now >= due:
                break
            time.sleep(POLL_S)
    if exited(p):
        leftovers = reap(p)
        note = f" LEFTOVER {leftovers}" if leftovers else ""
        return f"ended rc={p.returncode} before the kill{note}"
    at = time.monotonic() - t0
    leftovers = reap(p)  # SIGKILL the process group
    what = f"after step {max(last_step(run_dir), 0)}"
    if (tmp := saving(run_dir, started)):
        what += f", during save {tmp[4:]}"
    aim = f"{plan[1]:.2f}s" if plan[0] == "uniform" else f"save {plan[1]}+{plan[2]:.2f}s"
    return f"kill@{at:.2f}s [{aim}] ({what})"


def trial(i: int, rng: random.Random, args, base: list[str], work: Path, ref_rows, ref_ckpt, ref_wall) -> tuple[bool, str]:
    run_dir = work / f"trial_{i:02d}"
    log = work / f"trial_{i:02d}.log"
    overrides = [*base, f"run.dir={run_dir}"]
    events = []
    n_kills = 1 + rng.randint(0, 2)
    for _ in range(n_kills):
        resumed = int(complete_steps(run_dir)[-1][5:]) if complete_steps(run_dir) else 0
        plan = plan_kill(rng, ref_wall, args.steps, args.interval, resumed, args.save_bias)
        started = time.time() - 0.01  # ctime granularity
        p = start(overrides, log)
        events.append(run_until_kill(p, run_dir, plan, started))
    p = start(overrides, log)
    t0 = time.monotonic()
    while not exited(p) and time.monotonic() - t0 < RUN_TIMEOUT_S:
        time.sleep(0.01)
    timed_out = not exited(p)
    leftovers = reap(p)
    rc = p.returncode
    problems = []
    if timed_out:
        problems.append(f"final run timed out after {RUN_TIMEOUT_S}s")
    elif rc != 0:
        problems.append(f"final run exit code {rc}")
    if leftovers:
        problems.append(f"processes left after exit: {leftovers}")
    diff = compare(read_metrics(run_dir), ref_rows, args.rtol)
    if diff:
        problems.append(f"metrics differ: {diff}")
    ck = checkpoint_state(run_dir)
    leftover = ck.pop("other")
    if ck != {k: v for k, v in ref_ckpt.items() if k != "other"}:
        problems.append(f"checkpoints {ck} != reference {ref_ckpt}")
    if (timed_out or rc != 0) and log.exists():
        tail = [ln.strip()[:160] for ln in log.read_text().splitlines() if ln.strip()][-3:]
        problems.append("log tail: " + " / ".join(tail))
    line = f"trial {i:2d}: {'identical' if not problems else 'DIFFERENT'} | " + "; ".join(events) + " | finish"
    if problems:
        line += " | " + " | ".join(problems)
    if leftover:  # e.g. a kill while pruning: removed by the next commit (docs/checkpointing.md)
        line += f" | note: left in checkpoints/: {leftover}"
    return not problems, line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--interval", type=int, default=3, help="checkpoint.interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway if a trial differs)")
    ap.add_argument("--save-bias", type=float, default=0.35,
                    help="probability that a kill is aimed at a save in progress (default 0.35)")
    ap.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override (repeatable)")
    ap.add_argument("--workdir", help="where to put run dirs (default: a new temporary folder)")
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="relative tolerance per metric value (default 0: bit for bit, the CPU guarantee)")
    args = ap.parse_args(argv)
    deterministic = any(s.replace(" ", "") in ("train.deterministic=true", "train.deterministic=True")
                        for s in args.set)
    import torch
    if args.rtol == 0 and torch.cuda.is_available() and not deterministic:
        ap.error("on CUDA, resume is bit-exact only with --set train.deterministic=true; pass that, or "
                 "--rtol R to check agreement within R (docs/checkpointing.md)")
    if args.rtol < 0:
        ap.error("--rtol must be >= 0")
    if args.steps < 1 or args.interval < 1 or args.trials < 0:
        ap.error("--steps and --interval must be >= 1, --trials >= 0")

    base = ["recipe=smoke", f"train.max_steps={args.steps}", f"checkpoint.interval={args.interval}",
            "wandb.mode=disabled", *(["checkpoint.async_save=true"] if args.async_save else []), *args.set]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nld-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t_all = time.monotonic()
    ok = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"chaos: {args.trials} trials, nld-train {' '.join(base)}; seed {args.seed}; work dir {work}", flush=True)
        ref_dir = work / "reference"
        t0 = time.monotonic()
        p = start([*base, f"run.dir={ref_dir}"], work / "reference.log")
        while not exited(p) and time.monotonic() - t0 < RUN_TIMEOUT_S:
            time.sleep(0.01)
        reap(p)
        ref_wall = time.monotonic() - t0
        ref_rows = read_metrics(ref_dir)
        if p.returncode != 0 or [r["step"] for r in ref_rows] != list(range(1, args.steps + 1)):
            print(f"reference run failed (exit {p.returncode}); see {work / 'reference.log'}", flush=True)
            args.keep = True
            return 1
        ref_ckpt = checkpoint_state(ref_dir)
        print(f"reference: {args.steps} steps in {ref_wall:.1f}s, final loss {ref_rows[-1]['loss']:.6f}, "
              f"checkpoints {ref_ckpt['complete']}", flush=True)
        for i in range(args.trials):
            t0 = time.monotonic()
            same, line = trial(i, rng, args, base, work, ref_rows, ref_ckpt, ref_wall)
            ok += same
            print(f"{line} ({time.monotonic() - t0:.1f}s)", flush=True)
        left = [(g, m) for g in sorted(_groups) if (m := group_members(g))]
        if left:
            print(f"processes left behind: {left}", flush=True)
        print(f"{ok}/{args.trials} identical ({time.monotonic() - t_all:.0f}s)", flush=True)
        if ok != args.trials:
            args.keep = True
        return 0 if ok == args.trials and not left else 1
    finally:
        kill_all()
        if args.keep:
            print(f"kept {work}", flush=True)
        elif not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        kill_all()
        sys.exit(130)
