"""Real 2-process runs (torchrun, gloo): data parallelism and tensor parallelism change no math."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_trainer import grads, make_trainer, max_rel_diff


@pytest.fixture(scope="module")
def mp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(REPO / "tests" / "mp_checks.py"), str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out


@pytest.mark.parametrize("mbs", [2, 1])
def test_dp2_gradients_equal_single_process(dist1, tmp_path, mp_out, mbs):
    """DP=1 with one micro-batch of 4 == DP=2 with micro-batches of 2 or 1 (same global batch)."""
    ref_g, ref_s, ref_c = grads(make_trainer(tmp_path, "train.micro_batch_size=4"))
    got = torch.load(mp_out / f"dp2_mbs{mbs}.pt")
    assert torch.equal(got["counts"], ref_c)
    assert torch.allclose(got["sums"], ref_s, rtol=1e-5)
    assert max_rel_diff(got["grads"], ref_g) < 1e-4


def test_tp2_sequence_parallel_losses_equal_single_process(dist1, tmp_path, mp_out):
    tr = make_trainer(tmp_path, "train.micro_batch_size=4")
    ref = [tr.train_step(s) for s in range(3)]
    got = torch.load(mp_out / "tp2_losses.pt")
    for a, b in zip(got, ref):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
