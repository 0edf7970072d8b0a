"""Preemption: a signal asks every rank to save at the next step boundary and exit.

SIGTERM is what torchrun forwards to its workers (and what Slurm sends before a kill);
SIGUSR1/SIGUSR2 are what `srun --signal=...` delivers when ranks run directly under srun. The
handler only sets a flag; the checkpoint manager (``checkpoint/manager.py``) all-reduces it at each
step boundary so every rank stops after the same step, saves one consistent checkpoint and exits
with EXIT_PREEMPTED.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry" -> requeue
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption:
    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, device) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        flag = torch.tensor(1.0 if self.received else 0.0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; exits with EXIT_PREEMPTED."""

    def __init__(self, step: int, signame: str | None):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signame = step, signame
