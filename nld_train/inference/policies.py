"""Commit policies of block diffusion: which masked positions of a block a denoise pass fixes.

Apart from :mod:`.decoding` so that the learned sampler (:mod:`.sampler`), a policy itself, and the
SOL oracle (:mod:`.sol`) import them without importing the decoders.
"""
from __future__ import annotations

import abc

import torch


# -- commit policies (block diffusion) -------------------------------------------------------------
class CommitPolicy(abc.ABC):
    """Which masked positions of a block to commit after one denoise pass.

    ``select(cand [b,B], conf [b,B], masked [b,B] bool, step, n_init [b], offset)`` returns
    ``(commit [b,B] bool, tokens [b,B])``; it must commit at least one masked position of every row
    that still has one (otherwise the denoise loop would not terminate). ``offset`` is the index of the
    block's first token among the generated tokens (the SOL oracle needs it).
    """

    @abc.abstractmethod
    def select(self, cand, conf, masked, step, n_init, offset):
        ...

    def observe(self, logits, block):  # noqa: B027  (optional: most policies need only the confidences)
        """Called with the pass's ``logits [b,B,V]`` and input ``block [b,B]`` right before
        :meth:`select`; a policy that needs more than the confidences (the learned sampler) keeps them."""


def top1_mask(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    conf = conf.masked_fill(~masked, float("-inf"))
    top = torch.zeros_like(masked)
    top.scatter_(1, conf.argmax(1, keepdim=True), True)
    return top & masked


class ThresholdPolicy(CommitPolicy):
    """Always the most confident masked position, plus every other one with confidence >= threshold."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def select(self, cand, conf, masked, step, n_init, offset):
        return (masked & (conf >= self.threshold)) | top1_mask(conf, masked), cand


class EvenSplitPolicy(CommitPolicy):
    """HF's ``threshold=None``: the k_i most confident, k_i from an even split of the block's initial
    mask count over ``steps`` passes (earlier passes take the remainder; at least one)."""

    def __init__(self, steps: int):
        self.steps = steps

    def select(self, cand, conf, masked, step, n_init, offset):
        k = n_init // self.steps + (step < n_init % self.steps).long()
        k = torch.minimum(k.clamp(min=1), masked.sum(1))
        order = conf.masked_fill(~masked, float("-inf")).argsort(1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order).contiguous())
        return masked & (rank < k[:, None]), cand
