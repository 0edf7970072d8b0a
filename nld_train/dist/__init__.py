"""Process groups and capability detection: the one place that knows CPU/gloo from CUDA/NCCL.

Everything else asks :func:`capabilities` what the machine can do instead of probing itself.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import os
import socket
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


# megatron announces at import that it falls back from TE/apex; capabilities() reports that once
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are not installed|"
                        r"Apex is not installed|full scope is deprecated).*")


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    transformer_engine: bool  # TE importable *and* CUDA present: use the TE layer spec
    apex: bool
    device: str  # "cuda" or "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    cuda = torch.cuda.is_available()
    te = cuda and importlib.util.find_spec("transformer_engine") is not None
    apex = cuda and importlib.util.find_spec("apex") is not None
    return Capabilities(cuda=cuda, transformer_engine=te, apex=apex, device="cuda" if cuda else "cpu")


_PATCHED = False


def apply_cpu_patches() -> None:
    """The small patch set megatron-core needs on a CPU-only torch (see megatron-core-on-cpu.md §2).

    megatron-core allocates on ``torch.cuda.current_device()``, synchronises before checkpoint
    writes and keeps its model-parallel RNG states as CUDA generator states. On a machine without
    CUDA these become CPU equivalents. A no-op when CUDA is available.
    """
    global _PATCHED
    if capabilities().cuda or _PATCHED:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise RuntimeError(f"rng state {name}/{seed} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.states_[name])
                yield
                self.states_[name] = torch.get_rng_state()

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)
    _PATCHED = True


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tensor_model_parallel_size: int, backend: str = "auto", timeout_minutes: float = 10,
                     seed: int = 1234) -> Layout:
    """Start the process group (torchrun env, or a 1-process group) and megatron's parallel state."""
    apply_cpu_patches()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if "WORLD_SIZE" not in os.environ:  # plain `nld-train`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    caps = capabilities()
    if caps.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(caps.backend if backend == "auto" else backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if ps.model_parallel_is_initialized() and \
            ps.get_tensor_model_parallel_world_size() != tensor_model_parallel_size:
        ps.destroy_model_parallel()  # a pipeline stage with another layout
    if not ps.model_parallel_is_initialized():
        # the subgroups (data-parallel, tensor-parallel, ...) get the same timeout as the world group:
        # megatron's default is 30 minutes whatever parallel.timeout_minutes says
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                     distributed_timeout_minutes=timeout_minutes)
    # megatron's model-parallel RNG (dropout/init inside TP regions): same on TP peers by design
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))


_ON_RANK0_CALLS = 0


def on_rank0(fn, poll_s: float = 1.0):
    """``fn()`` on global rank 0 only, the other ranks waiting for it *outside any collective*.

    A rank 0 busy for longer than the process-group timeout (an evaluation during training) would
    trip the NCCL watchdog (or gloo's timeout) on ranks that wait in the next collective. Here they
    poll a key of the job's rendezvous store instead, which has no deadline; rank 0 sets the key
    when ``fn`` returns or raises, so an error on rank 0 is raised on every rank, not turned into a
    hang. Every rank must call this at the same points (the keys are numbered by call). Returns
    ``fn()``'s result on rank 0 and None elsewhere."""
    global _ON_RANK0_CALLS
    _ON_RANK0_CALLS += 1
    if dist.get_world_size() == 1:
        return fn()
    store = dist.distributed_c10d._get_default_store()
    key = f"nld_train/on_rank0/{_ON_RANK0_CALLS}"
    if dist.get_rank() == 0:
        try:
            out = fn()
        except BaseException as e:
            store.set(key, f"error: {type(e).__name__}: {e}"[:2000])
            raise
        store.set(key, "ok")
        return out
    while not store.check([key]):  # check() returns at once: no store timeout applies
        time.sleep(poll_s)
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"rank 0 failed while the other ranks waited for it: {status[len('error: '):]}")
    return None


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
