"""The megatron-core GPTModel, Llama/Mistral-shaped, with what NLD needs on top.

- positions from ``position_ids`` (megatron's plain rope ignores them; the joint layout repeats
  0..L-1 for both halves), YaRN frequencies, Llama-4 query scaling from each half's positions;
- the structured-mask core attention (:mod:`nld_train.model.attention`);
- a padded vocabulary for tensor parallelism whose padded entries never count in a loss and
  never win an argmax;
- TE layer spec when Transformer Engine and CUDA are present, local spec otherwise.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from nld_train.config import ModelConfig, ParallelConfig, padded_vocab_size
from nld_train.dist import capabilities
from nld_train.model.attention import (
    AttentionInputs,
    NLDCoreAttention,
    build_attention_inputs,
    build_packed_attention_inputs,
)
from nld_train.model.rope import query_scale, rope_inv_freq


class RMSNormSP(torch.nn.RMSNorm):
    """torch RMSNorm that accepts sequence parallelism (megatron's WrappedTorchNorm refuses it).

    The ``sequence_parallel`` tag makes ``finalize_model_grads`` all-reduce the weight's gradient
    over the TP group: under SP each rank only saw its slice of the sequence.
    """

    def __init__(self, config, hidden_size, eps=1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(use_te: bool):
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        layer = get_gpt_layer_with_transformer_engine_spec()
        norm = None  # TE fuses the pre-norms into the linear layers; final norm from TE below
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNormSP
        norm = RMSNormSP
    layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    layer.submodules.self_attention.submodules.core_attention = NLDCoreAttention
    return layer, norm


class NLDGPTModel(GPTModel):
    def __init__(self, *args, nld: ModelConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.nld = nld
        head_dim = self.config.kv_channels
        self.rotary_pos_emb.inv_freq = rope_inv_freq(head_dim, nld.rope_theta, nld.rope_scaling).to(
            self.rotary_pos_emb.inv_freq.device)
        self._mask_cache = {}

    def _apply(self, fn, recurse=True):
        # megatron keeps inv_freq as a plain attribute (not a buffer): module moves skip it, and its
        # own get_emb only moves it lazily from the CPU to the current CUDA device. Make it follow
        # every move of the parameters (back to the CPU, to meta) at once, as fp32 values whatever
        # dtype the cast asks for, so the angles below never mix devices or precisions.
        super()._apply(fn, recurse)
        if hasattr(self, "nld"):
            head_dim = self.config.kv_channels
            dev = fn(self.rotary_pos_emb.inv_freq).device
            self.rotary_pos_emb.inv_freq = rope_inv_freq(head_dim, self.nld.rope_theta, self.nld.rope_scaling).to(dev)
        return self

    # -- inputs -----------------------------------------------------------------------------
    def attention_inputs(self, kind: str, seq_len: int, block_size: int, device) -> AttentionInputs:
        """Cached masks for one layout (L = ``seq_len``); built from the shared mask predicate."""
        key = (kind, seq_len, block_size, str(device))
        if key not in self._mask_cache:
            backend = self.nld.attention_backend  # "auto": attention.select_backend per device
            qs = None
            if self.nld.query_scaling_beta:
                pos = torch.arange(seq_len, device=device)
                pos = pos.repeat(2) if kind == "joint" else pos
                qs = query_scale(pos, self.nld.query_scaling_beta,
                                 self.nld.rope_scaling.original_max_position_embeddings)
            self._mask_cache[key] = build_attention_inputs(kind, seq_len, block_size, backend, device, qs)
        return self._mask_cache[key]

    def packed_attention_inputs(self, kind: str, document_ids, position_ids, block_size: int) -> AttentionInputs:
        """Masks for packed rows (``document_ids`` [b, L]; ``position_ids`` [b, S] restart in every
        document, so the query scale follows them); one per micro-batch."""
        qs = None
        if self.nld.query_scaling_beta:
            qs = query_scale(position_ids, self.nld.query_scaling_beta,
                             self.nld.rope_scaling.original_max_position_embeddings)
        return build_packed_attention_inputs(kind, document_ids, block_size, self.nld.attention_backend, qs)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        # megatron's "rope" uses arange(S); rebuild the angles from position_ids [B, S]
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        # angles in fp32 whatever the parameters' dtype (see _apply)
        inv = self.rotary_pos_emb.inv_freq.float()
        freqs = position_ids.float()[..., None] * inv                # [B, S, D/2]
        emb = torch.cat([freqs, freqs], -1).transpose(0, 1)[:, :, None, :]  # [S, B, 1, D]
        return (out[0], emb.contiguous()) + tuple(out[2:])

    # -- outputs ----------------------------------------------------------------------------
    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [..., V/TP] of this TP rank with padded vocabulary entries set to -inf-ish."""
        local = logits.size(-1)
        start = ps.get_tensor_model_parallel_rank() * local if self.parallel_output else 0
        n_valid = self.nld.vocab_size - start
        if n_valid >= local:
            return logits
        ids = torch.arange(local, device=logits.device)
        return logits.masked_fill(ids >= n_valid, torch.finfo(logits.dtype).min)

    def compute_language_model_loss(self, labels, logits):
        """Per-token cross-entropy [B, S] over the real vocabulary (fp32, vocab-parallel)."""
        logits = self._mask_padded_vocab(logits.float())
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()

    def full_logits(self, input_ids, position_ids, attention: AttentionInputs):
        """Logits [B, S, vocab_size] gathered over TP, padded entries removed (sampling, tests)."""
        logits = self(input_ids, position_ids, attention, runtime_gather_output=True)
        return logits[..., : self.nld.vocab_size]


def transformer_config(m: ModelConfig, p: ParallelConfig) -> TransformerConfig:
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size, kv_channels=m.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=m.init_method_std, params_dtype=torch.float32,
        # full weights are drawn from the torch seed and then split: every TP layout starts from
        # the same weights (what makes TP=1 vs TP=2 comparisons exact). On CUDA, build_model moves
        # each weight to the device as soon as it is drawn (weights_drawn_on_cpu_then)
        use_cpu_initialization=True,
        tensor_model_parallel_size=p.tensor_model_parallel_size, sequence_parallel=p.sequence_parallel,
        # sum token losses; finalize_model_grads must not divide by DP (we normalise globally)
        calculate_per_token_loss=True,
        bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )


def _checkpointed(module: torch.nn.Module) -> None:
    """Recompute ``module`` in backward: only its inputs are kept (torch non-reentrant checkpoint,
    RNG state and autocast replayed). Training with gradients only; parameter names unchanged."""
    from torch.utils.checkpoint import checkpoint
    forward = module.forward

    def recomputed(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = recomputed


def apply_recompute(model: GPTModel, p: ParallelConfig) -> None:
    """parallel.recompute (validated in nld_train.config). Megatron's own recompute
    (TransformerConfig.recompute_granularity) is not used: in megatron-core 0.16.1 its checkpoint
    reads the CUDA RNG unconditionally (no CPU) and keeps its arguments with save_for_backward,
    which cannot hold the AttentionInputs object that the layers pass as attention mask."""
    if p.recompute == "none":
        return
    for layer in model.decoder.layers:
        if p.recompute == "full":  # megatron's full/uniform/1 layer: keep each layer's input only
            _checkpointed(layer)
            continue
        if "core_attn" in p.recompute_modules:
            _checkpointed(layer.self_attention.core_attention)
        if "mlp" in p.recompute_modules:
            _checkpointed(layer.mlp)


@contextlib.contextmanager
def weights_drawn_on_cpu_then(move):
    """While megatron builds a model with ``use_cpu_initialization``: every weight it draws (a full
    fp32 master weight from the torch CPU generator, split over TP, this rank's part kept) gets
    ``move(weight.data)`` as its data as soon as it is drawn (a dense tensor: CPU or CUDA).

    The draws, and so the weights, are exactly those of the plain CPU initialisation: the same
    generator, the same order, the same split. Only where the kept part lives changes, so the host
    holds one master weight at a time instead of this rank's whole model (fp32) until the end. What
    megatron does not draw this way (norm weights, biases: ones and zeros) stays where it is built.
    The GPU initialisation (``use_cpu_initialization=False``) is not used: it draws each TP shard
    from the CUDA RNG tracker's stream, other numbers than any CPU run and different per TP size."""
    from megatron.core.tensor_parallel import layers
    draw = layers._initialize_affine_weight_cpu

    def draw_then_move(weight, *args, **kwargs):
        out = draw(weight, *args, **kwargs)
        weight.data = move(weight.data)
        return out

    # the layers bind the function at import: patch every module that uses it (TE's when loaded)
    users = [mod for name in ("megatron.core.tensor_parallel.layers", "megatron.core.extensions.transformer_engine",
                              "megatron.core.transformer.moe.experts")
             if (mod := sys.modules.get(name)) is not None and getattr(mod, "_initialize_affine_weight_cpu", None) is draw]
    for mod in users:
        mod._initialize_affine_weight_cpu = draw_then_move
    try:
        yield
    finally:
        for mod in users:
            mod._initialize_affine_weight_cpu = draw


def build_model(m: ModelConfig, p: ParallelConfig, max_seq_length: int, seed: int) -> NLDGPTModel:
    """The training model on the current device; identical initial weights for any TP layout and
    any device. On CUDA each weight goes to the GPU as soon as it is drawn."""
    caps = capabilities()
    device = torch.device(caps.device)
    torch.manual_seed(seed)
    cfg = transformer_config(m, p)
    layer, norm = layer_spec(caps.transformer_engine)
    if norm is None:
        from megatron.core.extensions.transformer_engine import TENorm
        norm = TENorm
    spec = TransformerBlockSubmodules(layer_specs=[layer] * m.num_layers, layer_norm=norm)
    placed = contextlib.nullcontext() if device.type == "cpu" else weights_drawn_on_cpu_then(lambda t: t.to(device))
    with placed:
        model = NLDGPTModel(
            config=cfg, transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(m, p.tensor_model_parallel_size),
            max_sequence_length=max(max_seq_length, m.max_position_embeddings),
            position_embedding_type="rope", rotary_base=int(m.rope_theta),
            share_embeddings_and_output_weights=False, parallel_output=True, nld=m)
    apply_recompute(model, p)
    return model.to(device)  # the rest: norms, biases, rotary frequencies
