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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tensor_model_parallel_size: int, backend: str = "auto", timeout_minutes: int = 10,
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
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    # megatron's model-parallel RNG (dropout/init inside TP regions): same on TP peers by design
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                  tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
