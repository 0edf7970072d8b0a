"""RNG state across device kinds on resume (issue 17, item 8).

A CPU checkpoint holds CPU generator states for megatron's model-parallel RNG tracker (mt19937,
5056 bytes) and no CUDA state; a GPU checkpoint holds CUDA Philox states (16 bytes). megatron's
``set_states`` takes any of them without a check and the next ``fork()`` (sequence parallelism,
TP regions) fails. What applies is restored, the rest keeps its start-up seed, and the run says so.
"""
import random

import numpy as np
import torch

from nld_train.checkpoint import restorable_rng_state

NAME = "model-parallel-rng"


def cpu_state(seed):
    return torch.Generator().manual_seed(seed).get_state()          # uint8 [5056]


def cuda_like_state(seed):
    # what torch.cuda.get_rng_state() returns: Philox seed and offset as uint8 [16]
    return torch.cat([torch.tensor([seed], dtype=torch.int64).view(torch.uint8),
                      torch.zeros(8, dtype=torch.uint8)])


def saved(kind, seed=7):
    st = {"torch": torch.Generator().manual_seed(seed).get_state(), "numpy": np.random.RandomState(seed).get_state(),
          "python": random.Random(seed).getstate()}
    if kind == "cuda":
        st["cuda"] = cuda_like_state(seed)
        st["tracker"] = {NAME: cuda_like_state(seed + 1)}
    else:
        st["tracker"] = {NAME: cpu_state(seed + 1)}
    return st


def test_cpu_checkpoint_on_cuda_keeps_start_up_seeds_and_says_so():
    current = {NAME: cuda_like_state(1234)}
    tracker, cuda, notes = restorable_rng_state(saved("cpu"), current, cuda=True)
    assert torch.equal(tracker[NAME], current[NAME])          # not the 5056-byte CPU state
    assert cuda is None
    assert any("saved on another device kind" in n for n in notes)
    assert any("no CUDA RNG state" in n for n in notes)


def test_same_kind_is_restored_silently():
    st = saved("cuda")
    tracker, cuda, notes = restorable_rng_state(st, {NAME: cuda_like_state(1234)}, cuda=True)
    assert torch.equal(tracker[NAME], st["tracker"][NAME]) and torch.equal(cuda, st["cuda"]) and notes == []
    st = saved("cpu")
    tracker, cuda, notes = restorable_rng_state(st, {NAME: cpu_state(1234)}, cuda=False)
    assert torch.equal(tracker[NAME], st["tracker"][NAME]) and cuda is None and notes == []


def test_unknown_and_missing_tracker_names():
    st = saved("cpu")
    st["tracker"]["expert-parallel-rng"] = cpu_state(3)
    tracker, _, notes = restorable_rng_state(st, {NAME: cpu_state(1), "data-parallel-rng": cpu_state(2)}, cuda=False)
    assert set(tracker) == {NAME, "data-parallel-rng"}             # never a name this tracker lacks
    assert torch.equal(tracker["data-parallel-rng"], cpu_state(2))
    assert any("'data-parallel-rng'" in n and "kept as seeded" in n for n in notes)
    assert any("expert-parallel-rng" in n and "not restored" in n for n in notes)


def test_gpu_checkpoint_resumed_on_cpu_tracker_still_forks(dist1):
    """End to end on this machine, the direction CPU can run: a GPU-saved RNG file restored into
    the live (CPU) tracker; fork() must still work and the CPU generators are restored."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from nld_train.checkpoint import set_rng_state
    tracker = get_cuda_rng_tracker()
    before = {k: v.clone() for k, v in tracker.get_states().items()}
    st = saved("cuda", seed=11)
    try:
        notes = set_rng_state(st)
        assert torch.equal(torch.get_rng_state(), st["torch"])
        assert any("CUDA RNG state of the checkpoint not used" in n for n in notes)
        with tracker.fork():                               # raised in torch.set_rng_state before
            torch.rand(3)
    finally:
        tracker.set_states(before)
