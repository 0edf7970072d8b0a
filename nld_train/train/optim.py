"""AdamW over megatron DDP parameters, and the tensor-parallel-aware gradient norm/clip."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def build_optimizer(model, t) -> torch.optim.AdamW:
    """No weight decay on norms and biases (1-D tensors), the usual LM convention."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: one fixed kernel order, so resumed runs reproduce uninterrupted ones bit for bit
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             foreach=False)


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
