"""AdamW over megatron DDP parameters (optionally with its state sharded over data-parallel ranks),
and the tensor-parallel-aware gradient norm/clip."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.distributed.optim import ZeroRedundancyOptimizer


def build_optimizer(model, t, shard_group=None) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (1-D tensors), the usual LM convention.

    With ``shard_group`` (the data-parallel group; ``parallel.distributed_optimizer=true``) the AdamW
    state is split over its ranks (ZeRO stage 1, ``torch.distributed.optim.ZeroRedundancyOptimizer``):
    each rank keeps the moments of, and updates, only the parameters it owns, then broadcasts them
    (one flat bucket per rank: the parameters become views into ZeRO's buckets).
    Every parameter still gets exactly the same single-tensor AdamW update, so the weights equal the
    unsharded optimizer's bit for bit. docs/parallelism.md says why this and not megatron's
    DistributedOptimizer. ``nld_train.dist.local_optimizer`` gives the rank's own AdamW of either kind."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: one fixed kernel order, so resumed runs reproduce uninterrupted ones bit for bit
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
    if shard_group is None:
        return torch.optim.AdamW(groups, **kw)
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=shard_group,
                                   parameters_as_bucket_view=True, **kw)


def grad_norm_and_clip(params, max_norm: float) -> float:
    """Global L2 norm of ``main_grad`` across TP ranks; scales grads down when above ``max_norm``.

    Params split over TP count on every TP rank; replicated ones (norms) once (TP rank 0).
    After finalize_model_grads all DP ranks hold the same grads, so no DP reduction is needed.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    device = params[0].main_grad.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq += p.main_grad.float().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for p in params:
            p.main_grad.mul_(max_norm / (norm + 1e-6))
    return norm
