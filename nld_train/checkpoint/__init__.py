"""Distributed checkpoints (megatron dist_checkpointing, torch_dist) with an atomic commit.

Layout of ``<run.dir>/checkpoints/``::

    step_00000012/         one complete checkpoint (sharded tensors + nld_checkpoint.json)
    latest                 text file naming the newest complete step folder
    tmp.step_00000015/     a save in progress; never loaded

A save writes into ``tmp.step_N``, verifies it (megatron metadata, one RNG file per rank), writes
the commit marker ``nld_checkpoint.json``, renames the folder to ``step_N`` and only then replaces
``latest`` atomically. A folder without the marker is never loaded, so a process killed at any
point leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from nld_train import atomic

MARKER = "nld_checkpoint.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")


from nld_train.children import install_checkpoint_writer_hooks  # noqa: E402
from nld_train.dist import is_sharded, local_optimizer  # noqa: E402
from nld_train.errors import CheckpointError  # noqa: E402  (re-exported)


def run_config(step_dir, meta: Optional[dict] = None) -> dict:
    """The training config of a checkpoint as a dict: from its commit marker, else (checkpoints of
    older versions) the run dir's config.yaml."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir) if meta is None else meta
    if meta.get("config"):
        return meta["config"]
    run_yaml = step_dir.parent.parent / "config.yaml"
    if run_yaml.is_file():
        from omegaconf import OmegaConf
        return OmegaConf.to_container(OmegaConf.load(run_yaml), resolve=True)
    raise ValueError(f"checkpoint {step_dir} holds no training config (neither in its marker nor "
                     f"{run_yaml})")


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "metadata.json").is_file()


def complete_steps(run_dir) -> list[int]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and is_complete(p)]
    return sorted(steps)


def find_latest(run_dir) -> Optional[Path]:
    """The newest complete checkpoint of a run dir, or None if it holds none."""
    steps = complete_steps(run_dir)
    return checkpoints_dir(run_dir) / step_dir_name(steps[-1]) if steps else None


def resolve(path) -> Path:
    """A run dir, a checkpoints/ folder or a step folder -> a complete step folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if _STEP_RE.match(p.name):
        if not is_complete(p):
            raise CheckpointError(f"{p} is not a complete checkpoint (no {MARKER}): refusing to load it")
        return p
    for run_dir in (p, p.parent if p.name == "checkpoints" else None):
        if run_dir is not None and (found := find_latest(run_dir)):
            return found
    raise CheckpointError(f"no complete checkpoint under {p}")


def read_meta(step_dir) -> dict:
    path = Path(step_dir) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint marker {path} is unreadable ({type(e).__name__}: {e}); "
                              "move that step folder away to resume from the one before") from None


# -- optimizer state <-> sharded tensors ---------------------------------------------------------
def _optimizer_params(model, optimizer):
    """(the optimizer holding this rank's state, its parameters, {state id: the model's sharded
    tensor of that parameter}). Under ZeRO (parallel.distributed_optimizer) each rank describes
    only the parameters it owns, as their unique (main) replica: megatron's replica_id ends with the
    data-parallel rank, which becomes 0."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map
    local = local_optimizer(optimizer)
    params = [p for g in local.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(), params)
    if is_sharded(optimizer):
        id_map = {i: _as_main_dp_replica(sh) for i, sh in id_map.items()}
    return local, params, id_map


def _as_main_dp_replica(sh):
    from dataclasses import replace
    rid = sh.replica_id
    if not isinstance(rid, tuple) or not rid:
        raise CheckpointError(f"unexpected replica_id {rid!r} for {sh.key}: cannot shard its optimizer state")
    return replace(sh, replica_id=(*rid[:-1], 0))


def check_shardable_optimizer_state(model, optimizer) -> None:
    """Fail at start-up, not at the first save hours later, if a parameter's sharded tensor cannot
    carry a data-parallel-sharded optimizer state."""
    _optimizer_params(model, optimizer)


def _optimizer_sharded_state(model, optimizer):
    """AdamW state as sharded tensors keyed like the model's (``optimizer.state.exp_avg.<param>``).

    The same keys and global shapes whether or not the state is sharded over data-parallel ranks
    (see ``_optimizer_params``), so checkpoints move freely between both settings and any DP size."""
    from megatron.core.dist_checkpointing.optimizer import optim_state_to_sharding_state
    local, params, id_map = _optimizer_params(model, optimizer)
    # A fresh AdamW has no state yet; zeros at step 0 are exactly what its first step would create,
    # so saves before any step and loads into a fresh optimizer see the same structure.
    for p in params:
        if not local.state[p]:
            local.state[p] = dict(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                  exp_avg_sq=torch.zeros_like(p))
    sd = local.state_dict()
    optim_state_to_sharding_state(sd, id_map, exclude_keys=("step",))
    # AdamW's step is a scalar shared by all params: keep it once, outside the sharded tensors
    # (the common part is rank 0's, which owns at least the largest parameter)
    sd["common_step"] = local.state[params[0]]["step"] if params else torch.tensor(0.0)
    return sd


def rng_state() -> dict:
    """This rank's RNG states (torch, CUDA, numpy, python, megatron's tracker), as a checkpoint stores them."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _same_kind(saved, current) -> bool:
    """Generator states of the same kind: CPU (mt19937, 5056 bytes) and CUDA (Philox seed + offset,
    16 bytes) states are both uint8 tensors, told apart by their size."""
    return (torch.is_tensor(saved) and torch.is_tensor(current) and saved.dtype == current.dtype
            and saved.numel() == current.numel())


def restorable_rng_state(state: dict, current_tracker: dict, cuda: bool) -> tuple[dict, Optional[object], list]:
    """What of a saved RNG state applies on this machine: (tracker states to set, CUDA state to
    set or None, notes about what was kept as seeded at start-up instead).

    A checkpoint saved on CPU holds CPU generator states for megatron's model-parallel tracker and
    no CUDA state; one saved on a GPU holds CUDA states. megatron's ``set_states`` does not check
    sizes, and the first ``fork()`` (sequence-parallel and TP regions) would then fail in
    ``torch.cuda.set_rng_state`` (or ``torch.set_rng_state`` on CPU). So each tracker state is
    restored only if it is of the kind this machine's tracker holds; the others keep the state
    ``model_parallel_cuda_manual_seed(train.seed)`` gave them at start-up.
    """
    notes = []
    saved_tracker = state.get("tracker") or {}
    tracker = dict(current_tracker)
    kept = []
    for name, cur in current_tracker.items():
        if name in saved_tracker and _same_kind(saved_tracker[name], cur):
            tracker[name] = saved_tracker[name]
        else:
            kept.append(name)
    if kept:
        why = "not in the checkpoint" if not saved_tracker else "saved on another device kind (CPU vs CUDA)"
        notes.append(f"model-parallel RNG {kept} {why}: kept as seeded from train.seed at start-up")
    foreign = sorted(set(saved_tracker) - set(current_tracker))
    if foreign:
        notes.append(f"model-parallel RNG {foreign} unknown to this run's tracker: not restored")
    cuda_state = None
    if cuda:
        if "cuda" in state:
            cuda_state = state["cuda"]
        else:
            notes.append("no CUDA RNG state in the checkpoint (saved without CUDA): the CUDA generator keeps "
                         "its start-up seed")
    elif "cuda" in state:
        notes.append("CUDA RNG state of the checkpoint not used (no CUDA here)")
    return tracker, cuda_state, notes


def set_rng_state(state: dict) -> list:
    """Restore what applies on this machine (see ``restorable_rng_state``); returns the notes."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    states, cuda_state, notes = restorable_rng_state(state, tracker.get_states(), torch.cuda.is_available())
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)
    tracker.set_states(states)
    return notes


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- save / load ----------------------------------------------------------------------------------
def save(run_dir, step: int, model, optimizer, meta: dict, keep_last: int, keep_every: int = 0,
         async_queue=None) -> Path:
    """Collective: every rank calls it. Writes ``tmp.step_N`` and commits it to ``step_N``.

    ``optimizer=None`` saves the weights only (``nld-convert from-hf``). With ``async_queue``
    (megatron ``AsyncCallsQueue``) the tensors are written in the background and the commit runs,
    on all ranks, when the queue finalizes the request at a later step boundary; until then
    ``latest`` still names the previous checkpoint.
    """
    from megatron.core import dist_checkpointing

    install_checkpoint_writer_hooks()  # its helper processes die with this one (a kill -9 mid-save)
    rank = dist.get_rank()
    final = checkpoints_dir(run_dir) / step_dir_name(step)
    tmp = atomic.tmp_path(final)
    if rank == 0:  # a save of this step that died half-way is garbage by construction: begin removes it
        atomic.begin(final)
    dist.barrier()
    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_sharded_state(model, optimizer)

    def commit():
        _commit(run_dir, step, meta, keep_last, keep_every)

    def write_rng():  # after megatron's save started: it warns about non-empty folders
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")

    if async_queue is None:
        dist_checkpointing.save(sharded, str(tmp))
        write_rng()
        commit()
    else:
        request = dist_checkpointing.save(sharded, str(tmp), async_sharded_save=True)
        write_rng()
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)
    return final


def _commit(run_dir, step: int, meta: dict, keep_last: int, keep_every: int) -> None:
    """Collective. Verify the temporary folder, mark it complete, publish it, prune old ones."""
    dist.barrier()
    root, final = checkpoints_dir(run_dir), checkpoints_dir(run_dir) / step_dir_name(step)
    tmp = atomic.tmp_path(final)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        missing = [r for r in range(world) if not (tmp / "rng" / f"rank_{r:05d}.pt").is_file()]
        if not (tmp / "metadata.json").is_file() or missing:
            raise CheckpointError(f"checkpoint {tmp} failed verification (metadata or rng of ranks {missing})")
        with open(tmp / MARKER, "w") as f:  # durable before the rename publishes it
            f.write(json.dumps({**meta, "step": step, "world_size": world}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        atomic.publish(tmp, final)  # re-saving a step: the old one is moved aside, then deleted
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(step_dir_name(step) + "\n")
        os.replace(latest_tmp, root / "latest")
        for old in complete_steps(run_dir)[:-keep_last]:
            if not (keep_every and old % keep_every == 0):
                # renamed to trash.* before the delete: a kill mid-delete never leaves a step_*
                # folder that still looks complete but lacks shards
                atomic.remove(root / step_dir_name(old), ignore_errors=True)
        for p in root.iterdir():  # what such kills left, and temporary folders of saves that died (one save at a time)
            if p.name.startswith(atomic.TRASH_PREFIX) or (p.name.startswith(atomic.TMP_PREFIX) and p.is_dir()):
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()


def check_compatible(meta: dict, model_shape: dict, path) -> None:
    """A checkpoint of another model shape is refused with the differing keys named."""
    saved = meta.get("model_shape", {})
    diff = {k: (saved.get(k), v) for k, v in model_shape.items() if k in saved and saved[k] != v}
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} has another model shape ({lines})")


# Transformer Engine modules carry an ``_extra_state`` entry (their FP8 scaling metadata: an empty
# or pickled uint8 tensor; megatron saves it as a ShardedObject). megatron's own linears have the
# same entries (value None) so those keys match across TE / no TE, but TE's final norm
# (te.pytorch.RMSNorm) has one that the local spec's norm lacks. These entries, and only these,
# may be absent on either side: a checkpoint saved without TE (CPU runs, nld-convert from-hf)
# loads into a TE model whose FP8 state then starts fresh, and a TE checkpoint loads into a model
# without TE (nld-convert to-hf, nld-generate on a laptop), which has no use for FP8 state.
EXTRA_STATE_SUFFIX = "_extra_state"


def _is_extra_state(key: str) -> bool:
    return key.endswith(EXTRA_STATE_SUFFIX)


def _check_mismatch(step_dir, request_only: set, ckpt_only: set, weights_only: bool) -> list:
    """Keys the model requested that the checkpoint lacks, and keys the checkpoint holds that were
    not requested: refuse anything but TE extra state (and, for a weights-only load, the optimizer
    state of a full checkpoint). Returns the requested extra-state keys the checkpoint lacks."""
    lacking = sorted(k for k in request_only if not _is_extra_state(k))
    if lacking:
        raise CheckpointError(f"could not load checkpoint {step_dir}: it lacks {len(lacking)} tensor(s) this "
                              f"load needs: {lacking[:6]}{' ...' if len(lacking) > 6 else ''}")
    unused = sorted(k for k in ckpt_only
                    if not _is_extra_state(k) and not (weights_only and k.startswith("optimizer.")))
    if unused:
        raise CheckpointError(f"could not load checkpoint {step_dir}: it holds {len(unused)} tensor(s) this "
                              f"model has no place for: {unused[:6]}{' ...' if len(unused) > 6 else ''}")
    return sorted(request_only)


def _requested_keys(request: dict) -> set:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    return {v.key for v in nested_values(request) if hasattr(v, "key")}


def _saved_keys(step_dir) -> set:
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    return {v.key for v in load_sharded_metadata(str(step_dir)).values()}


# The deprecation notices megatron 0.16's torch_dist load raises through torch.distributed.checkpoint
# on every load (it still builds ShardedTensors and calls the old load_state_dict): nothing a user
# can act on. Exactly these are silenced, by category, module and message, around our load only.
LOAD_WARNINGS = (
    ("megatron.core.dist_checkpointing.strategies.torch", "`load_state_dict` is deprecated"),
    ("torch.distributed.checkpoint.planner_helpers", "Please use DTensor instead and we are deprecating ShardedTensor"),
    ("torch.distributed.checkpoint.default_planner", "Please use DTensor instead and we are deprecating ShardedTensor"),
)


@contextlib.contextmanager
def quiet_load_warnings():
    with warnings.catch_warnings():
        for module, message in LOAD_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=FutureWarning,
                                    module=re.escape(module) + "$")
        yield


def load(step_dir, model, optimizer=None, model_shape: Optional[dict] = None, restore_rng: bool = True) -> dict:
    """Collective. Loads weights (and optimizer + RNG unless weights-only); returns the meta dict.

    Any tensor-parallel / data-parallel layout can load any other one's checkpoint: megatron's
    sharded state dict describes how each tensor is split.
    """
    from megatron.core import dist_checkpointing
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    if model_shape is not None:
        check_compatible(meta, model_shape, step_dir)
    request = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        request["optimizer"] = _optimizer_sharded_state(model, optimizer)
    from megatron.core.dist_checkpointing.validation import StrictHandling
    try:
        # tensors this load needs that the checkpoint lacks, refused by name before reading (megatron
        # would drop them from the request and fail later, in a factory merge, without naming them)
        _check_mismatch(step_dir, _requested_keys(request) - _saved_keys(step_dir), set(), optimizer is None)
        # RETURN_ALL: keys requested but not saved are dropped from the request and returned
        # (with the saved keys nobody requested), so they are judged below, not by a storage error
        with quiet_load_warnings():
            loaded, ckpt_only, request_only = dist_checkpointing.load(request, str(step_dir),
                                                                      strict=StrictHandling.RETURN_ALL)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # say which checkpoint and why, in one line
        # (torch's CheckpointException derives from BaseException and carries per-rank failures)
        cause = next(iter(getattr(e, "failures", {}).values()), e)
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, stack summary)
        text = str(cause).strip()
        reason = type(cause).__name__ + (f": {text.splitlines()[0]}" if text else " (a file is truncated or corrupt)")
        raise CheckpointError(f"could not load checkpoint {step_dir}: {reason}") from e
    fresh = _check_mismatch(step_dir, set(request_only), set(ckpt_only), optimizer is None)
    result = model.load_state_dict(loaded["model"], strict=False)
    # a module's extra state the checkpoint lacks keeps its fresh value; nothing else may be absent
    missing = [k for k in result.missing_keys if not _is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"could not load checkpoint {step_dir} into this model: missing {missing[:6]}, "
                              f"unexpected {result.unexpected_keys[:6]}")
    skipped = sorted(set(k for k in ckpt_only if _is_extra_state(k)))
    if (fresh or skipped) and dist.get_rank() == 0:
        print(f"checkpoint {step_dir.name}: Transformer Engine extra state (FP8 scaling metadata) "
              + (f"absent from the checkpoint for {len(fresh)} module(s), starting fresh ({fresh[0]}"
                 f"{' ...' if len(fresh) > 1 else ''})" if fresh else "")
              + ("; " if fresh and skipped else "")
              + (f"saved for {len(skipped)} module(s) this model does not have, not used ({skipped[0]}"
                 f"{' ...' if len(skipped) > 1 else ''})" if skipped else ""), flush=True)
    if optimizer is not None:
        opt_sd = loaded["optimizer"]
        step = opt_sd.pop("common_step")
        for st in opt_sd["state"].values():
            st["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))
        local_optimizer(optimizer).load_state_dict(opt_sd)
        rng_file = step_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
        from megatron.core import parallel_state as ps
        same_layout = (meta.get("world_size") == dist.get_world_size()
                       and meta.get("tensor_model_parallel_size") == ps.get_tensor_model_parallel_world_size())
        if restore_rng and same_layout and rng_file.is_file():  # RNG states belong to a rank's role
            notes = set_rng_state(torch.load(rng_file, weights_only=False))
            if notes and dist.get_rank() == 0:
                print(f"checkpoint {step_dir.name}: RNG restored except: " + "; ".join(notes), flush=True)
    return meta
