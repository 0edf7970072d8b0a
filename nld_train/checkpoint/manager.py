"""When a training run saves: the checkpoint cadence, owned by one object instead of the loop.

The trainer calls :meth:`CheckpointManager.maybe_save` once at the end of every step; the manager
decides, from ``checkpoint.*``:

- every ``checkpoint.interval`` steps: a save (in the background with ``checkpoint.async_save``);
- on a preemption signal (SIGTERM/SIGUSR1/SIGUSR2, ``preemption.py``), seen by all ranks at the
  same step boundary: a synchronous save unless this step was just saved, then ``Preempted``;
- at the last step, with ``checkpoint.save_final``: a synchronous save unless this step was just
  saved; then it waits for any background save.

A step is never saved twice: a resumed run's step is already on disk. One background save is in
flight at a time: a new save first waits for (and commits) the previous one. What is saved besides
the weights and the optimizer is the trainer's ``state_dict()`` (the commit marker's meta); the
commit itself (verify, marker, rename, ``latest``, retention) is ``checkpoint.save``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from nld_train.checkpoint import save
from nld_train.checkpoint.preemption import EXIT_PREEMPTED, Preempted, Preemption


class CheckpointManager:
    """``cfg``: the ``checkpoint`` config group; ``state_dict()``: the meta dict of the current step;
    ``saved_step``: the step already on disk (a resumed run's), or None."""

    def __init__(self, run_dir, cfg, model, optimizer, state_dict: Callable[[], dict], device,
                 saved_step: Optional[int] = None, log: Callable[[str], None] = print):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.model, self.optimizer, self.state_dict = model, optimizer, state_dict
        self.device, self.log = device, log
        self.saved_step = saved_step
        self.async_queue = None
        if cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self.async_queue = AsyncCallsQueue(persistent=False)  # persistent workers need CUDA
        # last: a signal that arrives while the trainer is still being built ends the process the
        # default way (there is nothing new to save yet)
        self.preemption = Preemption()

    def maybe_save(self, step: int, last: bool = False) -> None:
        """Collective, at the end of step ``step`` (``last``: the run's final step)."""
        c = self.cfg
        if self.async_queue is not None:  # commit a background save whose files are all written
            self.async_queue.maybe_finalize_async_calls(blocking=False)
        if c.interval and step % c.interval == 0 and self.saved_step != step:
            self.save(step)
        if self.preemption.requested(self.device):
            if self.saved_step != step:
                self.save(step, sync=True)
            self.wait()
            self.log(f"preempted ({self.preemption.received or 'signal on another rank'}): "
                     f"checkpoint at step {step} committed, exiting with code {EXIT_PREEMPTED}")
            raise Preempted(step, self.preemption.received)
        if last:
            if c.save_final and self.saved_step != step:
                self.save(step, sync=True)
            self.wait()

    def save(self, step: int, sync: bool = False) -> Path:
        """Collective: save step ``step`` now, in the background if ``checkpoint.async_save`` and not ``sync``."""
        c = self.cfg
        meta = self.state_dict()
        t0 = time.time()
        queue = self.async_queue if not sync else None
        self.wait()  # one save in flight at a time
        path = save(self.run_dir, step, self.model, self.optimizer, meta, c.keep_last, c.keep_every,
                    async_queue=queue)
        self.saved_step = step
        self.log(f"{'scheduled async' if queue else 'saved'} checkpoint {path} ({time.time() - t0:.1f}s blocking)")
        return path

    def wait(self) -> None:
        """Collective: block until a background save is committed."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        """Restore the signal handlers; commit a background save still in flight."""
        self.preemption.restore()
        if self.async_queue is not None:
            self.async_queue.close()
