"""CheckpointManager: when a run saves (interval, last step, preemption, never a step twice), what
it keeps, background saves committed in order, and a failed save that leaves the last checkpoint
as it was. The cadence is checked with the saves recorded; the rest with real saves of the smoke
model (1-process gloo group)."""
import json
import os
import signal

import pytest

from nld_train import checkpoint as ckpt
from nld_train.checkpoint import manager as manager_mod
from nld_train.checkpoint.manager import CheckpointManager
from nld_train.checkpoint.preemption import EXIT_PREEMPTED, Preempted
from nld_train.config import CheckpointConfig
from tests.test_robustness import snapshot, step_dirs
from tests.test_trainer import make_trainer


# -- cadence (the saves recorded, not written) ----------------------------------------------------
@pytest.fixture
def recorded(dist1, tmp_path, monkeypatch):
    """make(**checkpoint config) -> (manager, saves): the (step, async?) of every save it makes."""
    saves, managers = [], []

    def fake_save(run_dir, step, model, optimizer, meta, keep_last, keep_every, async_queue=None):
        assert meta == {"step": step}, "saved with another step's state"
        saves.append((step, async_queue is not None))
        return tmp_path / ckpt.step_dir_name(step)
    monkeypatch.setattr(manager_mod, "save", fake_save)
    state = {}

    def make(saved_step=None, **cfg):
        m = CheckpointManager(tmp_path, CheckpointConfig(**cfg), None, None, lambda: dict(state), "cpu",
                              saved_step=saved_step, log=lambda msg: None)
        managers.append(m)
        return m

    def run(m, first, last_step):
        for step in range(first, last_step + 1):
            state["step"] = step
            m.maybe_save(step, last=step == last_step)
    yield make, run, saves
    for m in managers:
        m.close()


def test_interval_and_final_save(recorded):
    make, run, saves = recorded
    run(make(interval=3), 1, 10)
    assert saves == [(3, False), (6, False), (9, False), (10, False)]
    del saves[:]
    run(make(interval=3, async_save=True), 1, 10)
    assert saves == [(3, True), (6, True), (9, True), (10, False)], "the final save is synchronous"


def test_last_step_on_the_interval_is_saved_once(recorded):
    make, run, saves = recorded
    run(make(interval=3, async_save=True), 1, 6)
    assert [s for s, _ in saves] == [3, 6]


def test_no_final_save_when_switched_off_and_interval_zero(recorded):
    make, run, saves = recorded
    run(make(interval=0, save_final=False), 1, 5)
    assert saves == []
    run(make(interval=0), 1, 5)
    assert saves == [(5, False)]


def test_a_resumed_step_is_not_saved_again(recorded):
    make, _, saves = recorded
    m = make(interval=3, saved_step=6)
    m.maybe_save(6, last=True)  # interval, final: the step that was loaded is on disk
    m.preemption.received = "SIGTERM"
    with pytest.raises(Preempted):
        m.maybe_save(6)
    assert saves == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_synchronously_once_and_raises(recorded, sig):
    make, run, saves = recorded
    m = make(interval=3)
    for step in (1, 2):
        m.maybe_save(step)
    os.kill(os.getpid(), sig)  # the handler records it; the step boundary acts on it
    with pytest.raises(Preempted) as e:
        run(m, 3, 10)
    assert (e.value.step, e.value.signame, e.value.code) == (3, sig.name, EXIT_PREEMPTED)
    assert saves == [(3, False)], "the interval save of step 3 is the preemption checkpoint: no second save"
    m2 = make(interval=3)
    m2.preemption.received = "SIGUSR2"
    with pytest.raises(Preempted):
        run(m2, 4, 10)
    assert saves[1:] == [(4, False)]


def test_close_restores_the_signal_handlers(recorded):
    make, _, _ = recorded
    before = signal.getsignal(signal.SIGTERM)
    m = make()
    assert signal.getsignal(signal.SIGTERM) != before
    m.close()
    assert signal.getsignal(signal.SIGTERM) == before


# -- real saves -----------------------------------------------------------------------------------
def test_retention_with_real_saves(dist1, tmp_path):
    tr = make_trainer(tmp_path, "checkpoint.interval=2", "checkpoint.keep_last=1", "checkpoint.keep_every=3")
    kept = {2: [2], 3: [2], 4: [4], 6: [6], 8: [6, 8], 9: [6, 9]}  # 6: a multiple of keep_every
    try:
        for step in range(1, 10):
            tr.step = step
            tr.skipped_steps = step // 2
            tr.checkpointer.maybe_save(step, last=step == 9)
            if step in kept:
                assert step_dirs(tmp_path / "run") == [ckpt.step_dir_name(s) for s in kept[step]], step
        assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000009\n"
        meta = ckpt.read_meta(ckpt.find_latest(tmp_path / "run"))
        assert meta == {**tr.state_dict(), "world_size": 1}, "the commit marker is the trainer's state_dict"
        resumed = make_trainer(tmp_path)
        resumed.close()
        assert (resumed.step, resumed.skipped_steps, resumed.schedule_steps, resumed.train_samples) == \
            (9, 4, tr.schedule_steps, tr.train_samples)
    finally:
        tr.close()


def test_async_saves_commit_in_order_one_at_a_time(dist1, tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, "checkpoint.async_save=true", "checkpoint.keep_last=5", "checkpoint.interval=0")
    events = []
    real_commit = ckpt._commit

    def commit(run_dir, step, *args):
        events.append(("commit", step))
        real_commit(run_dir, step, *args)
    monkeypatch.setattr(ckpt, "_commit", commit)
    real_save = manager_mod.save
    monkeypatch.setattr(manager_mod, "save", lambda run_dir, step, *a, **kw: (events.append(("start", step)),
                                                                               real_save(run_dir, step, *a, **kw))[1])
    try:
        for step in (1, 2):
            tr.step = step
            tr.checkpointer.save(step)
        assert events == [("start", 1), ("commit", 1), ("start", 2)], "a save started before the previous one committed"
        assert ckpt.complete_steps(tmp_path / "run") == [1], "an async save was committed before it was finalized"
        tr.step = 3
        tr.checkpointer.maybe_save(3, last=True)  # the final save: synchronous, after the one in flight
        assert events == [("start", 1), ("commit", 1), ("start", 2), ("commit", 2), ("start", 3), ("commit", 3)]
        assert ckpt.complete_steps(tmp_path / "run") == [1, 2, 3]
    finally:
        tr.close()


def test_failed_save_leaves_the_previous_checkpoint_intact(dist1, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tr = make_trainer(tmp_path, "checkpoint.keep_last=1")
    try:
        tr.step = 2
        tr.save()
        before = snapshot(run_dir / "checkpoints" / "step_00000002")

        def broken():
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(ckpt, "rng_state", broken)  # after the tensors are written, before the commit
        tr.step = 4
        with pytest.raises(OSError, match="No space left"):
            tr.save()
        assert snapshot(run_dir / "checkpoints" / "step_00000002") == before
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002\n"
        assert ckpt.find_latest(run_dir).name == "step_00000002"
        assert "step_00000004" not in step_dirs(run_dir)
        resumed = make_trainer(tmp_path, name="run")
        resumed.close()
        assert resumed.step == 2
        monkeypatch.undo()
        tr.step = 6
        tr.save()  # the next commit removes what the failed save left
        assert step_dirs(run_dir) == ["step_00000006"]
        assert json.loads((run_dir / "checkpoints" / "step_00000006" / "nld_checkpoint.json").read_text())["step"] == 6
    finally:
        tr.close()
