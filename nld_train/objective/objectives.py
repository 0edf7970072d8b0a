"""Objectives: turn a data micro-batch into model inputs, and per-token CE back into sums.

The model is called as ``ce = model(input_ids, position_ids, attention=kind, targets)`` and
returns per-token cross-entropy [b, S] (S = L for AR, 2L for joint); everything else is here.

An objective is one :class:`Objective` subclass registered under its config name
(``objective.name``) with :func:`register_objective`: it builds itself from the config, and answers
what the trainer, the planner and the FLOPs count ask (tokens per sample, data alignment, attended
keys, the loss normalisation), so none of them looks at the objective's name (docs/architecture.md,
"Adding an objective").

Packed rows (SFT: several conversations per row) also bring ``document_ids`` [b, L] and per-document
``position_ids`` [b, L]; the attention then never crosses documents (``masks.packed_allowed``) and
each conversation's positions start at 0, as if it were alone in its row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Type

import torch

from nld_train.errors import ConfigError

from .losses import NORMALIZATIONS, ar_sums, diffusion_sums
from .losses import normalized_loss as _normalized_loss
from .losses import reported_losses as _reported_losses
from .noise import maskable_positions, noise_seed, sample_noise


@dataclass
class Prepared:
    """One micro-batch ready for the model."""
    input_ids: torch.Tensor          # [b, S]
    position_ids: torch.Tensor       # [b, S]: 0..L-1 (twice for joint: each half its own)
    attention: str                   # "causal" or "joint"
    targets: torch.Tensor            # [b, S] target id per position (any valid id where unused)
    loss_mask: torch.Tensor          # [b, L] float, label-aligned AR mask
    masked: torch.Tensor | None      # [b, L] bool noisy positions (joint only)
    p: torch.Tensor | None           # [b] masking probability per row (joint only)
    n_ar: torch.Tensor               # 0-dim float: Σ loss_mask
    n_diff: torch.Tensor             # 0-dim float: number of masked positions (0 for AR)
    document_ids: torch.Tensor | None = None  # [b, L] packed rows: attention stays inside a document


def _check_batch(tokens, labels, loss_mask, sample_indices, document_ids=None, position_ids=None) -> None:
    if tokens.dim() != 2 or labels.shape != tokens.shape or loss_mask.shape != tokens.shape:
        raise ValueError(f"tokens, labels and loss_mask must all be [b, L], got {tuple(tokens.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}")
    if len(sample_indices) != tokens.shape[0]:
        raise ValueError(f"need one sample index per row: {len(sample_indices)} for {tokens.shape[0]} rows")
    if (document_ids is None) != (position_ids is None):
        raise ValueError("packed rows need both document_ids and position_ids (or neither)")
    for name, t in (("document_ids", document_ids), ("position_ids", position_ids)):
        if t is not None and t.shape != tokens.shape:
            raise ValueError(f"{name} must be [b, L] = {list(tokens.shape)}, got {list(t.shape)}")


def _positions(b: int, L: int, device, position_ids=None) -> torch.Tensor:
    if position_ids is not None:
        return position_ids.to(device=device, dtype=torch.long)
    return torch.arange(L, device=device).repeat(b, 1)


class Objective:
    """Base class: holds the loss weights and normalisation; subclasses build the inputs.

    A subclass sets ``name`` (its ``objective.name``) and implements :meth:`from_config`,
    :meth:`prepare` and :meth:`sums`; it overrides the layout facts below when its model input is
    not the plain causal L tokens."""
    name: str = ""
    has_diffusion: bool = False

    def __init__(self, alpha: float, ar_weight: float, normalization: str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if alpha < 0 or ar_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got alpha={alpha}, ar_weight={ar_weight}")
        self.alpha, self.ar_weight, self.normalization = float(alpha), float(ar_weight), normalization

    # -- from the config ------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg) -> None:
        """ConfigError naming the key for a config (nld_train.config.Config) this objective cannot
        train; the keys every objective has are checked by ``config.validate``."""

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """This objective with the config's settings (unchecked: see :func:`objective_from_config`)."""
        raise NotImplementedError

    # -- what the trainer, the planner and the FLOPs count ask -----------------------------------
    def tokens_per_sample(self, seq_length: int) -> int:
        """Model tokens per data sample of ``seq_length`` tokens (activations, FLOPs)."""
        return seq_length

    def attended_keys(self, seq_length: int) -> float:
        """Key positions a data token's queries attend to on average, counted as Megatron-LM counts
        causal attention (S/2 keys per token: the diagonal half-pairs are not counted)."""
        return seq_length / 2

    @property
    def data_alignment(self) -> int:
        """Token positions where packed documents may start (the data pipeline's ``align``)."""
        return 1

    def describe(self) -> str:
        """The settings worth naming after ``objective=<name>`` (the planner's report)."""
        return ""

    def describe_tokens(self, seq_length: int) -> str:
        """Model tokens per sample, as the planner's report writes them."""
        return str(self.tokens_per_sample(seq_length))

    @classmethod
    def flops_label(cls, x_ar: float) -> str:
        """How the planner names this objective's FLOPs per token (``x_ar``: its cost over AR's)."""
        return f"{cls.name} ({x_ar:.2f}x AR)"

    # -- tensor code -----------------------------------------------------------------------------
    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        raise NotImplementedError

    def sums(self, ce: torch.Tensor, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def normalized_loss(self, s_ar, s_diff, n_ar, n_diff, n_microbatches: int = 1) -> torch.Tensor:
        return _normalized_loss(s_ar, s_diff, n_ar, n_diff, alpha=self.alpha, ar_weight=self.ar_weight,
                                normalization=self.normalization, n_microbatches=n_microbatches)

    def loss(self, s_ar, s_diff, prepared: Prepared, global_counts, n_microbatches: int) -> torch.Tensor:
        """The scalar to backward for one micro-batch: normalised by the whole global batch's
        counts ``global_counts`` = [N_AR, N_masked], or by the micro-batch's own counts for
        ``per_microbatch`` (the public recipe's ablation; ``n_microbatches`` over all DP ranks)."""
        if self.normalization == "per_microbatch":
            n_ar, n_diff = prepared.n_ar, prepared.n_diff
        else:
            n_ar, n_diff = global_counts[0], global_counts[1]
        return self.normalized_loss(s_ar, s_diff, n_ar, n_diff, n_microbatches=n_microbatches)

    def reported_losses(self, s_ar, s_diff, n_ar, n_diff) -> dict:
        return _reported_losses(s_ar, s_diff, n_ar, n_diff, alpha=self.alpha, ar_weight=self.ar_weight,
                                normalization=self.normalization, has_diffusion=self.has_diffusion)


_OBJECTIVES: Dict[str, Type[Objective]] = {}


def register_objective(cls: Type[Objective]) -> Type[Objective]:
    """Class decorator: ``objective.name=<cls.name>`` selects ``cls``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if _OBJECTIVES.get(cls.name, cls) is not cls:
        raise ValueError(f"objective {cls.name!r} is already registered ({_OBJECTIVES[cls.name].__name__})")
    _OBJECTIVES[cls.name] = cls
    return cls


def unregister_objective(name: str) -> None:
    del _OBJECTIVES[name]


def objective_names() -> tuple:
    return tuple(_OBJECTIVES)


def objective_class(name: str) -> Type[Objective]:
    """The class of ``objective.name``; ConfigError naming the key for an unknown name."""
    if name not in _OBJECTIVES:
        raise ConfigError(f"objective.name: {name!r} is not one of {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def objective_from_config(cfg) -> Objective:
    """The objective of ``cfg.objective.name``, checked against ``cfg`` and built."""
    cls = objective_class(cfg.objective.name)
    cls.check_config(cfg)
    return cls.from_config(cfg)


@register_objective
class ARObjective(Objective):
    """Plain causal LM over L tokens (stage 1)."""
    name = "ar"

    def __init__(self, ar_weight: float = 1.0, normalization: str = "combined"):
        super().__init__(alpha=0.0, ar_weight=ar_weight, normalization=normalization)

    @classmethod
    def from_config(cls, cfg) -> "ARObjective":
        o = cfg.objective
        return cls(ar_weight=o.ar_weight, normalization=o.loss_normalization)

    @classmethod
    def flops_label(cls, x_ar: float) -> str:
        return "stage 1 (AR)"

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        _check_batch(tokens, labels, loss_mask, sample_indices, document_ids, position_ids)
        b, L = tokens.shape
        lm = loss_mask.to(device=tokens.device, dtype=torch.float32)
        return Prepared(input_ids=tokens, position_ids=_positions(b, L, tokens.device, position_ids),
                        attention="causal", targets=labels, loss_mask=lm, masked=None, p=None, n_ar=lm.sum(),
                        n_diff=torch.zeros((), device=tokens.device), document_ids=document_ids)

    def sums(self, ce, prepared):
        if ce.shape != prepared.loss_mask.shape:
            raise ValueError(f"expected per-token CE of shape [b, L] = {list(prepared.loss_mask.shape)}, "
                             f"got {list(ce.shape)}")
        s_ar, _ = ar_sums(ce, prepared.loss_mask)
        return s_ar, torch.zeros((), device=s_ar.device)


@register_objective
class JointObjective(Objective):
    """Joint AR + block diffusion over the 2L layout [x_t ; x_0] (stage 2, SFT)."""
    name = "joint"
    has_diffusion = True

    def __init__(self, mask_token_id: int, block_size: int, alpha: float = 0.3, ar_weight: float = 1.0,
                 eps: float = 1e-3, normalization: str = "combined", seed: int = 1234):
        super().__init__(alpha=alpha, ar_weight=ar_weight, normalization=normalization)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.mask_token_id, self.block_size, self.eps, self.seed = int(mask_token_id), block_size, eps, int(seed)

    @classmethod
    def check_config(cls, cfg) -> None:
        t, o = cfg.train, cfg.objective
        if t.seq_length % o.block_size:
            raise ConfigError(f"train.seq_length: {t.seq_length} is not divisible by objective.block_size="
                              f"{o.block_size}")

    @classmethod
    def from_config(cls, cfg) -> "JointObjective":
        o = cfg.objective
        return cls(mask_token_id=cfg.model.mask_token_id, block_size=o.block_size, alpha=o.alpha,
                   ar_weight=o.ar_weight, eps=o.noise_eps, normalization=o.loss_normalization, seed=cfg.train.seed)

    def tokens_per_sample(self, seq_length: int) -> int:
        return 2 * seq_length   # [x_t ; x_0]

    def attended_keys(self, seq_length: int) -> float:
        # the L clean tokens see L/2 keys on average, the L noisy tokens (L + B)/2 (their own block
        # plus the clean blocks before it): L + B/2 keys per data token
        return seq_length + self.block_size / 2

    @property
    def data_alignment(self) -> int:
        return self.block_size   # a packed conversation starts a diffusion block

    def describe(self) -> str:
        return f" (alpha {self.alpha}, block {self.block_size})"

    def describe_tokens(self, seq_length: int) -> str:
        return f"{2 * seq_length} (2L joint)"

    @classmethod
    def flops_label(cls, x_ar: float) -> str:
        return f"stage 2 (joint, {x_ar:.2f}x AR)"

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None,
                position_ids=None) -> Prepared:
        _check_batch(tokens, labels, loss_mask, sample_indices, document_ids, position_ids)
        b, L = tokens.shape
        if L % self.block_size != 0:
            raise ValueError(f"sequence length {L} must be a multiple of block_size {self.block_size}")
        # Seeds come from global sample indices, so noise does not depend on the batch split.
        seeds = [noise_seed(self.seed, int(i)) for i in sample_indices]
        maskable = maskable_positions(loss_mask, packed=document_ids is not None)
        nt = sample_noise(tokens, maskable, self.mask_token_id, seeds, self.eps)
        lm = loss_mask.to(device=tokens.device, dtype=torch.float32)
        pos = _positions(b, L, tokens.device, position_ids)
        return Prepared(
            input_ids=torch.cat([nt.noisy, tokens], dim=1),
            position_ids=torch.cat([pos, pos], dim=1),  # both halves 0..L-1 (same RoPE per half)
            attention="joint",
            # noisy half: the clean token at the SAME position (unshifted, spec §1.5);
            # clean half: the next token (standard AR).
            targets=torch.cat([tokens, labels], dim=1),
            loss_mask=lm, masked=nt.masked, p=nt.p, n_ar=lm.sum(), n_diff=nt.masked.sum().float(),
            document_ids=document_ids)

    def sums(self, ce, prepared):
        L = prepared.loss_mask.shape[1]
        if ce.shape != (prepared.loss_mask.shape[0], 2 * L):
            raise ValueError(f"expected per-token CE of shape [b, 2L] = "
                             f"{[prepared.loss_mask.shape[0], 2 * L]}, got {list(ce.shape)}")
        s_diff, _ = diffusion_sums(ce[:, :L], prepared.masked, prepared.p)
        # Unlike the public Megatron code, the AR term respects the loss mask (SFT prompts, padding).
        s_ar, _ = ar_sums(ce[:, L:], prepared.loss_mask)
        return s_ar, s_diff


def build_objective(name: str, **kwargs) -> Objective:
    """``build_objective("ar", ...)`` or ``build_objective("joint", mask_token_id=..., block_size=...)``."""
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name](**kwargs)
