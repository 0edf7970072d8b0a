"""Training objective: masks, noise, losses, objectives (pure tensor code: no model, no dist)."""
from .losses import NORMALIZATIONS, ar_sums, diffusion_sums, normalized_loss, reported_losses
from .masks import (
                    causal_attention_mask,
                    causal_mask_mod,
                    joint_allowed,
                    joint_attention_mask,
                    joint_mask_mod,
                    packed_allowed,
                    packed_attention_mask,
                    packed_mask_mod,
)
from .noise import NoisedTokens, maskable_positions, noise_at_ratio, noise_seed, sample_noise
from .objectives import (
                    ARObjective,
                    JointObjective,
                    Objective,
                    Prepared,
                    build_objective,
                    objective_class,
                    objective_from_config,
                    objective_names,
                    register_objective,
                    unregister_objective,
)

__all__ = [
    "NORMALIZATIONS", "ar_sums", "diffusion_sums", "normalized_loss", "reported_losses",
    "causal_attention_mask", "causal_mask_mod", "joint_allowed", "joint_attention_mask", "joint_mask_mod",
    "packed_allowed", "packed_attention_mask", "packed_mask_mod",
    "NoisedTokens", "maskable_positions", "noise_at_ratio", "noise_seed", "sample_noise",
    "ARObjective", "JointObjective", "Objective", "Prepared", "build_objective",
    "objective_class", "objective_from_config", "objective_names", "register_objective", "unregister_objective",
]
