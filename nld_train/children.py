"""Helper processes that end with the process that started them.

megatron-core's checkpoint writer starts processes that nothing stops when a training process is
killed with SIGKILL (an out-of-memory kill, ``kill -9``, a node agent): a ``spawn`` multiprocessing
manager that carries the write results (started at the first save, kept for the life of the
process, with the resource tracker it keeps alive), the forked writer processes of every save, and
for ``checkpoint.async_save`` the forked process that runs the writers. An orphaned manager was
found alive, parent PID 1 and ~270 MB resident, half an hour after its trainer was killed.
:func:`install_checkpoint_writer_hooks` makes each of them ask Linux for SIGKILL when its parent
dies (``PR_SET_PDEATHSIG``). The data preparation pool (``nld_train.data.prepare``) does the same.

Kept free of heavy imports: the manager is a ``spawn`` child that imports this module.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int) -> None:
    """Call first thing in a child process: the kernel SIGKILLs it when ``parent_pid`` (the process,
    strictly the thread, that started it) exits, however it exits. If the parent is already gone,
    exit now. A no-op off Linux, which has no parent-death signal."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:  # died before prctl: the signal will never come
        os._exit(1)


_INSTALLED = False
_OWNER = 0           # the process that installed the hooks (the trainer / converter)
_WRITER_PARENT = 0   # the process that forks the writers of the current save (fork-inherited)


def install_checkpoint_writer_hooks() -> None:
    """Make megatron's checkpoint helper processes exit with their parent (see the module doc).
    Idempotent; call before the first ``dist_checkpointing.save`` of the process. Save from the
    main thread (as the trainer does): Linux sends the parent-death signal when the *thread* that
    started a child exits, so a manager started from a short-lived thread would die with it."""
    global _INSTALLED, _OWNER
    if _INSTALLED:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    _OWNER = os.getpid()

    def write_results_queue():
        # megatron's own version: ctx.Manager().Queue() with nothing to stop the manager's server
        if fa._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
            fa._results_queue = manager.Queue()  # the proxy keeps the manager object alive
        return fa._results_queue

    multiproc = fa.FileSystemWriterAsync.write_preloaded_data_multiproc
    worker = fa.FileSystemWriterAsync.write_preloaded_data

    @functools.wraps(multiproc)
    def write_preloaded_data_multiproc(*args, **kwargs):
        global _WRITER_PARENT
        if os.getpid() != _OWNER:  # checkpoint.async_save: the process forked to run the writers
            exit_with_parent(_OWNER)
        _WRITER_PARENT = os.getpid()
        return multiproc(*args, **kwargs)

    @functools.wraps(worker)
    def write_preloaded_data(*args, **kwargs):
        exit_with_parent(_WRITER_PARENT)
        return worker(*args, **kwargs)

    fa._get_write_results_queue = write_results_queue
    fa.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_preloaded_data_multiproc)
    fa.FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)
    _INSTALLED = True
