"""train.deterministic (issue 17, item 7): what it switches on, and that on CPU (deterministic
anyway) it changes no number. Its GPU effect is checked by `pytest -m cuda` (tests/test_cuda.py)."""
import os

import pytest
import torch

from nld_train.dist import apply_determinism


@pytest.fixture
def restore_flags():
    """apply_determinism changes process-wide state: put it all back for the rest of the session."""
    names = ("CUBLAS_WORKSPACE_CONFIG", "NVTE_ALLOW_NONDETERMINISTIC_ALGO")
    env = {k: os.environ.pop(k, None) for k in names}
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], flags[2]
    for k, v in env.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_flags(restore_flags, monkeypatch):
    assert apply_determinism(False) == [] and not torch.are_deterministic_algorithms_enabled()
    applied = apply_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in applied
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG"):
        apply_determinism(True)


def test_cpu_training_is_unchanged_and_key_is_free_on_resume(dist1, tmp_path, restore_flags, one_thread):
    from nld_train.cli import load_config
    from nld_train.config import math_changes
    from nld_train.train.trainer import Trainer
    losses = {}
    for det in (False, True):
        cfg = load_config(["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled",
                           f"run.dir={tmp_path / str(det)}", f"train.deterministic={det}"], world_size=1)
        tr = Trainer(cfg)
        assert torch.are_deterministic_algorithms_enabled() == det
        losses[det] = [tr.train_step(s)["loss"] for s in range(2)]
    assert losses[True] == losses[False]
    a = load_config(["recipe=smoke", "train.deterministic=false"])
    b = load_config(["recipe=smoke", "train.deterministic=true"])
    import dataclasses
    assert math_changes(dataclasses.asdict(a), dataclasses.asdict(b)) == []


def test_chaos_resume_compares_bit_exact_or_within_rtol(monkeypatch):
    import sys

    from tests.conftest import REPO
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import chaos_resume as c
    ref = [{"step": 1, "loss": 1.0, "loss_ar": 1.0, "loss_diff": 0.5, "grad_norm": 2.0, "lr": 1e-3, "skipped_steps": 0}]
    near = [dict(ref[0], loss=1.0 + 1e-7)]
    assert "loss" in c.compare(near, ref)                       # default: bit for bit
    assert c.compare(near, ref, rtol=1e-6) is None
    assert "skipped_steps" in c.compare([dict(ref[0], skipped_steps=1)], ref, rtol=0.5)  # counts: exact
    # on CUDA without train.deterministic a bit-exact check is refused, not run
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(SystemExit):
        c.main(["--trials", "0"])
    assert sys.modules["chaos_resume"] is c
