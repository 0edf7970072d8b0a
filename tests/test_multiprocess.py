"""Real multi-process runs (torchrun, gloo): the parallel layout never changes the math.

One 2-process launch covers DP=2 (micro-batches of 2 and 1), TP=2 and TP=2 + sequence parallel
for stage 1 (AR) and stage 2 (joint) — gradients after one step and losses over three — and
resharding (TP=1 checkpoint -> DP=2 / TP=2, TP=2 checkpoint -> TP=1). A 4-process launch covers
TP=2 x DP=2. Everything is compared with 1-process runs in this process.
"""
import json
import shutil
import sys

import pytest
import torch

from tests.conftest import REPO, run_group
from tests.mp_checks import LAYOUTS, OVERLAP_TWINS, OVERLAP_TWINS_FOUR, STAGES
from tests.test_trainer import grads, make_trainer, max_rel_diff


def launch(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(REPO / "tests" / "mp_checks.py"), *map(str, args)]
    res = run_group(cmd, 900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def run_to(tmp_path, run_dir, max_steps, *overrides):
    tr = make_trainer(tmp_path, *overrides, f"train.max_steps={max_steps}", "train.lr_schedule_steps=8",
                      name=run_dir)
    tr.fit()
    tr.close()
    return tmp_path / run_dir


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def mp_out(tmp_path_factory, dist1):
    out = tmp_path_factory.mktemp("mp")
    tp1 = run_to(out, "tp1_ckpt", 2, "train.micro_batch_size=4")  # the checkpoint the launch reshards
    launch(2, out, tp1)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist1):
    """1 process, one micro-batch of 4: gradients of batch 0 and 3 steps of losses per stage."""
    out = {}
    for stage, ov in STAGES.items():
        tmp = tmp_path_factory.mktemp(f"ref_{stage}")
        g, s, c = grads(make_trainer(tmp, *ov, "train.micro_batch_size=4", name="g"))
        tr = make_trainer(tmp, *ov, "train.micro_batch_size=4", name="l")
        out[stage] = {"grads": g, "sums": s, "counts": c, "losses": [tr.train_step(i) for i in range(3)]}
    return out


def assert_same(got, ref, what):
    assert torch.equal(got["counts"], ref["counts"]), what
    assert torch.allclose(got["sums"], ref["sums"], rtol=1e-5), what
    assert max_rel_diff(got["grads"], ref["grads"]) < 1e-4, what
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (what, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"], what


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_process_layouts_equal_one_process(mp_out, reference, stage, layout):
    assert_same(torch.load(mp_out / f"{stage}_{layout}.pt"), reference[stage], f"{stage} {layout}")


def assert_bitwise(got, ref, what):
    assert torch.equal(got["counts"], ref["counts"]) and torch.equal(got["sums"], ref["sums"]), what
    assert got["grads"].keys() == ref["grads"].keys(), what
    for k in ref["grads"]:
        assert torch.equal(got["grads"][k], ref["grads"][k]), (what, k)
    assert [(r["loss"], r["grad_norm"]) for r in got["losses"]] == [(r["loss"], r["grad_norm"]) for r in ref["losses"]], what


@pytest.mark.parametrize("layout", list(OVERLAP_TWINS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_overlapped_grad_reduce_changes_nothing(mp_out, stage, layout):
    """parallel.overlap_grad_reduce with 8 buckets at DP=2 (2 micro-batches per rank; with and
    without the sharded optimizer): gradients of batch 0 and 3 steps of losses and gradient norms
    equal the non-overlapped run bit for bit (a sum of two fp32 values does not depend on when it
    is taken)."""
    assert_bitwise(torch.load(mp_out / f"{stage}_{layout}.pt"),
                   torch.load(mp_out / f"{stage}_{OVERLAP_TWINS[layout]}.pt"), f"{stage} {layout}")


def test_weights_moved_as_drawn_at_tp2(mp_out):
    """Start-up on CUDA at TP=2 (tests/test_model.py has TP=1): each rank's weights, moved as they
    are drawn, equal the plain CPU initialisation bit for bit."""
    assert torch.load(mp_out / "init_tp2.pt") == {"ranks_passed": 2}


def test_tp2_checkpoint_resumes_at_tp1(mp_out, tmp_path):
    shutil.copytree(mp_out / "tp2_ckpt", tmp_path / "r")
    resumed = metrics(run_to(tmp_path, "r", 4, "train.micro_batch_size=4"))
    cont = metrics(mp_out / "tp2_cont")
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - cont[step]["loss"]) < 1e-5, step


@pytest.mark.parametrize("target", ["from_tp1_dp2", "from_tp1_tp2", "from_tp1_dp2_zero", "zero_cont"])
def test_checkpoints_resume_across_layouts(mp_out, tmp_path, target):
    """Steps 3-4 after a step-2 checkpoint equal the 1-process continuation of the TP=1 checkpoint:
    TP=1 -> DP=2, TP=2 + SP, DP=2 with the sharded optimizer state; and a checkpoint written by
    DP=2 with the sharded state, resumed the same way (zero_cont)."""
    shutil.copytree(mp_out / "tp1_ckpt", tmp_path / "r")
    uninterrupted = metrics(run_to(tmp_path, "r", 4, "train.micro_batch_size=4"))
    got = metrics(mp_out / target)
    assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 kept from the checkpointed run, each step once
    for step in (3, 4):
        assert abs(got[step]["loss"] - uninterrupted[step]["loss"]) < 1e-5, (target, step)


def test_distributed_optimizer_shards_the_state_and_keeps_the_weights(mp_out):
    """parallel.distributed_optimizer=true at DP=2: the weights after 3 steps equal the unsharded
    optimizer's bit for bit, and each rank holds about half of the AdamW state (none twice)."""
    got = torch.load(mp_out / "zero_bitwise.pt")
    assert got["equal"]
    assert got["numel"]["plain"] == [got["total"]] * 2
    assert sum(got["numel"]["zero"]) == got["total"]
    assert max(got["numel"]["zero"]) < 0.55 * got["total"], got["numel"]
    # the planner's model of the partition (whole parameters, largest first, least loaded rank)
    from nld_train.cli import load_config
    from nld_train.plan import sharded_optimizer_max_numel
    m = load_config(["recipe=smoke"]).model
    assert max(got["numel"]["zero"]) == sharded_optimizer_max_numel(m, 1, 2)


def test_sharded_optimizer_checkpoint_resumes_unsharded_at_tp1(mp_out, tmp_path):
    """A checkpoint written with the AdamW state sharded over DP=2 continues on one process with the
    unsharded optimizer exactly like the sharded continuation."""
    shutil.copytree(mp_out / "zero_ckpt", tmp_path / "r")
    resumed = metrics(run_to(tmp_path, "r", 4, "train.micro_batch_size=4"))
    cont = metrics(mp_out / "zero_cont")
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - cont[step]["loss"]) < 1e-5, step


@pytest.fixture(scope="module")
def mp4_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp4")
    launch(4, out, "--four")
    return out


def test_four_processes_tp2_dp2(mp4_out, reference):
    for stage in STAGES:
        assert_same(torch.load(mp4_out / f"{stage}_tp2dp2.pt"), reference[stage], f"{stage} tp2xdp2")
    for name in ("joint_tp2dp2_zero", *OVERLAP_TWINS_FOUR):
        assert_same(torch.load(mp4_out / f"{name}.pt"), reference["joint"], name)


@pytest.mark.parametrize("name", list(OVERLAP_TWINS_FOUR))
def test_overlapped_grad_reduce_changes_nothing_at_tp2_dp2(mp4_out, name):
    """TP=2 x DP=2 (+ SP), joint, 2 micro-batches per rank, 8 buckets, with and without the sharded
    optimizer: bit for bit the non-overlapped run."""
    assert_bitwise(torch.load(mp4_out / f"{name}.pt"), torch.load(mp4_out / f"{OVERLAP_TWINS_FOUR[name]}.pt"), name)


def test_sharded_optimizer_checkpoint_at_tp2_dp2_resumes_at_tp1(mp4_out, tmp_path):
    """TP=2 x DP=2 with the sharded state (tensor-parallel replicas of the norms included): its
    step-2 checkpoint continues on one process like on four, and like the uninterrupted run."""
    shutil.copytree(mp4_out / "zero4_ckpt", tmp_path / "r")
    resumed = metrics(run_to(tmp_path, "r", 4, "train.micro_batch_size=4"))
    uninterrupted = metrics(run_to(tmp_path, "u", 4, "train.micro_batch_size=4"))
    cont = metrics(mp4_out / "zero4_cont")
    assert sorted(cont) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(uninterrupted[step]["loss"] - cont[step]["loss"]) < 1e-5, step
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - cont[step]["loss"]) < 1e-5, step


def test_slow_evaluation_on_rank0_outlasts_the_collective_timeout(tmp_path):
    """An evaluation on rank 0 longer than parallel.timeout_minutes (gloo, 2 processes): the other
    rank waits for it outside any collective and the run completes with the evaluation logged; an
    error on rank 0 inside nld_train.dist.on_rank0 is raised on both ranks instead of hanging them."""
    from tests.mp_eval_wait import EVAL_S, TIMEOUT_MIN
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(REPO / "tests" / "mp_eval_wait.py"), str(tmp_path)]
    res = run_group(cmd, 600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert min(r0["slow_s"], r1["slow_s"]) > EVAL_S > TIMEOUT_MIN * 60  # rank 1 did wait that long
    assert metrics(tmp_path / "slow")[1]["eval/slow/accuracy"] == 1.0
    assert (tmp_path / "slow" / "checkpoints" / "latest").exists()  # the collective save after it
    assert r0["fail"] == "ValueError: the evaluation broke"
    assert r1["fail"].startswith("RuntimeError: rank 0 failed") and "the evaluation broke" in r1["fail"]
