"""Process groups and capability detection: the one place that knows CPU/gloo from CUDA/NCCL.

Everything else asks :func:`capabilities` what the machine can do instead of probing itself.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from nld_train.errors import InputError

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


# the Transformer Engine versions megatron-core 0.16.1 is released against (its `dev` extra pins
# transformer-engine>=2.9.0a0,<2.12.0; pyproject's [gpu] extra uses the same range)
TE_SUPPORTED = ((2, 9), (2, 12))


def te_version_note(version: str) -> "str | None":
    """None if ``version`` is in TE_SUPPORTED, else a sentence saying what is known about it."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"transformer-engine {version!r}: version not understood"
    lo, hi = TE_SUPPORTED
    if lo <= major_minor < hi:
        return None
    return (f"transformer-engine {version} is outside the range megatron-core 0.16.1 supports "
            f"(>={lo[0]}.{lo[1]}, <{hi[0]}.{hi[1]}; docs/recipes.md §8): the TE layer spec may fail or differ")


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    cuda = torch.cuda.is_available()
    te = cuda and importlib.util.find_spec("transformer_engine") is not None
    if te:
        from importlib import metadata
        try:
            note = te_version_note(metadata.version("transformer-engine"))
        except metadata.PackageNotFoundError:   # source builds may register no distribution
            note = None
        if note:
            warnings.warn(note)
    apex = cuda and importlib.util.find_spec("apex") is not None
    return Capabilities(cuda=cuda, transformer_engine=te, apex=apex, device="cuda" if cuda else "cpu")


def apply_determinism(enabled: bool) -> list:
    """``train.deterministic``: make every kernel of a training step deterministic, or fail loudly.

    Must run before the first CUDA matmul (cuBLAS reads its workspace setting once). CPU training
    is deterministic already; on CUDA this turns on torch's deterministic mode, in which an
    operation without a deterministic implementation raises instead of running (nothing silently
    non-deterministic), and SDPA does not pick cuDNN attention (torch's backend selection skips it
    in this mode); FlexAttention's default Triton backward is deterministic (its FLASH backend
    refuses this mode below SM100 and is not used); cuDNN autotuning is off and Transformer Engine
    is told not to use non-deterministic algorithms. Returns what was set, for the log.
    """
    if not enabled:
        return []
    workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if workspace not in (":4096:8", ":16:8"):
        raise ValueError(f"train.deterministic: CUBLAS_WORKSPACE_CONFIG={workspace!r} does not make cuBLAS "
                         "deterministic; unset it or use :4096:8 (or :16:8)")
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return ["torch.use_deterministic_algorithms(True)", f"CUBLAS_WORKSPACE_CONFIG={workspace}",
            "cudnn.deterministic", "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0"]


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


_LOCAL_RANK = 0  # this process's GPU index on its node, set by init_distributed


def launched_world_size() -> int:
    """The world size a launcher (torchrun, srun via slurm/train.sbatch) gave this process; 1 when
    started on its own. Only WORLD_SIZE decides: RANK/MASTER_* left over from another command (a
    parent that ran init_distributed in an older version, a shell that exported them) do not make a
    one-process command join a rendezvous."""

    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        # `srun -n 8 nld-train ...` without a launcher: every task would train on its own, all
        # into the same run.dir (SLURM_STEP_NUM_TASKS exists in srun's tasks, not in the batch shell)
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
        if tasks.isdigit() and int(tasks) > 1:
            raise InputError(f"started as one of {tasks} tasks of an srun step, but WORLD_SIZE is not set: each "
                             "task would run alone. Submit with slurm/train.sbatch (it sets RANK/WORLD_SIZE per "
                             "task), or run one task (srun --ntasks=1)")
        return 1
    try:
        world = int(raw)
    except ValueError:
        raise InputError(f"WORLD_SIZE={raw!r} in the environment is not a number") from None
    if world < 1:
        raise InputError(f"WORLD_SIZE={world} in the environment must be >= 1")
    return world


def init_distributed(tensor_model_parallel_size: int, backend: str = "auto", timeout_minutes: float = 10,
                     seed: int = 1234) -> Layout:
    """Start the process group and megatron's parallel state.

    Launched with a world > 1 (torchrun, srun): the env:// rendezvous at MASTER_ADDR:MASTER_PORT.
    A world of one (``nld-train`` on its own, ``nld-convert``, ``nld-generate``, ``load_model`` in a
    notebook, a torchrun of one rank) needs no TCP at all: the group's store lives in this process,
    so no port is bound (no EADDRINUSE between concurrent commands, no port-picking race) and
    ``os.environ`` is left as it was (a child process started later does not inherit a rendezvous).
    """
    global _LOCAL_RANK
    apply_cpu_patches()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = launched_world_size()
    caps = capabilities()
    _LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if caps.cuda:
        torch.cuda.set_device(_LOCAL_RANK)
    if not dist.is_initialized():
        backend = caps.backend if backend == "auto" else backend
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world == 1:
            rank = os.environ.get("RANK", "0")
            if rank != "0":
                raise InputError(f"RANK={rank} in the environment, but WORLD_SIZE is 1")
            # megatron's sub-groups (new_group) share this store under their own prefixes
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
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


@contextlib.contextmanager
def preserved_environ():
    """Hand the caller's ``os.environ`` back unchanged: for library calls (``load_model``, the HF
    converters) whose imports and set-up write to it as a side effect (importing megatron-core sets
    TORCHINDUCTOR_CACHE_DIR; megatron drops NCCL_COLLNET_ENABLE while it creates groups). A child
    process the caller starts afterwards then sees the environment the caller set up, nothing more."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if os.environ != saved:
            os.environ.clear()
            os.environ.update(saved)


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                  local_rank=_LOCAL_RANK)


# The optimizer is built in train.optim; these two live here because the checkpoint (a lower layer
# than train) must also tell a data-parallel-sharded (ZeRO) optimizer from a plain one.
def local_optimizer(optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: the ZeRO shard's AdamW, or the optimizer itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def is_sharded(optimizer) -> bool:
    """Whether the optimizer state is split over the data-parallel ranks (parallel.distributed_optimizer)."""
    return isinstance(optimizer, ZeroRedundancyOptimizer)


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
