"""Typed configuration: the single source of truth for every key a recipe may set.

Hydra recipes (``recipes/``) only set values; these dataclasses define which keys exist, their
types and defaults, and :func:`validate` checks the combinations no type can express (parallel
layout, batch arithmetic, block size). Nothing here imports torch or megatron, so a wrong key
fails before any heavy import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from nld_train.errors import ConfigError  # noqa: E402  (re-exported: nld_train.config.ConfigError)


@dataclass
class RopeScalingConfig:
    # "none": plain RoPE; "yarn": YaRN frequency interpolation (Ministral-3 / NLD bases).
    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int = 4
    ffn_hidden_size: int = 704
    # head dimension; None = hidden_size / num_attention_heads
    kv_channels: Optional[int] = None
    # true vocabulary size (the tokenizer's); padded inside nld-train for tensor parallelism
    vocab_size: int = 8192
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Llama-4 query scaling 1 + beta * ln(1 + floor(pos / original_max)); None = off.
    # Positions are each half's own 0..L-1 (not the 2L concatenation, see docs/objective.md).
    query_scaling_beta: Optional[float] = None
    # token id of [MASK]; must equal the tokenizer's mask token (checked at start)
    mask_token_id: int = 1
    # biases on the query/key/value projections (Qwen2-family models imported with nld-convert)
    qkv_bias: bool = False
    init_method_std: float = 0.02
    # "auto": FlexAttention block masks on CUDA, dense boolean-mask SDPA on CPU
    attention_backend: str = "auto"


@dataclass
class ObjectiveConfig:
    # "ar" (stage 1) or "joint" (stage 2, SFT): a name registered in nld_train.objective, which also
    # checks the keys that depend on it (nld_train.cli.load_config)
    name: str = "ar"
    alpha: float = 0.3
    ar_weight: float = 1.0
    block_size: int = 32
    noise_eps: float = 1e-3
    # combined: (alpha*S_diff + w*S_ar) / (N_masked + N_ar); separate: alpha*S_diff/N_masked +
    # w*S_ar/N_ar (both over the whole global batch); per_microbatch: public-recipe ablation
    loss_normalization: str = "combined"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # "auto": nccl on CUDA, gloo on CPU
    backend: str = "auto"
    # timeout of every collective, in every process group (megatron's subgroups included); a
    # fraction is allowed (tests use seconds). Waits on rank 0's in-training evaluation are not
    # collectives and never time out (nld_train.dist.on_rank0)
    timeout_minutes: float = 10
    # activation recomputation (same results bit for bit, less memory, ~1 more forward of compute):
    # "none"; "selective": recompute parallel.recompute_modules inside every layer; "full": keep
    # only each layer's input and recompute the whole layer in backward (megatron's full/uniform/1
    # layer). See docs/recipes.md
    recompute: str = "none"
    # for recompute=selective: any of "core_attn", "mlp"
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    # the AdamW state split over the data-parallel ranks (ZeRO stage 1: each rank updates and keeps
    # the moments of whole parameters it owns, then broadcasts them); same weights bit for bit,
    # same checkpoint format. See docs/parallelism.md
    distributed_optimizer: bool = False
    # megatron DDP: all-reduce each gradient bucket as soon as the backward of the last micro-batch
    # has produced it, overlapped with the rest of that backward; null = on with CUDA (NCCL), off on
    # CPU. The same gradients as without overlap (tests/test_multiprocess.py). docs/parallelism.md
    overlap_grad_reduce: Optional[bool] = None
    # parameters per all-reduce bucket when overlapping; null = megatron's max(40M, 1M x DP)
    ddp_bucket_size: Optional[int] = None


@dataclass
class DataConfig:
    # an indexed-shard prefix, or a blend "w1 prefix1 w2 prefix2" (list or string)
    path: Any = None
    split: str = "98,2,0"
    # where megatron caches its sample indices; None = <run.dir>/data_cache
    cache_dir: Optional[str] = None
    # "gpt": documents concatenated into rows by megatron's GPTDataset (pretraining); "sft": chat
    # shards from nld-prepare-data with loss masks, whole conversations packed per row (docs/data.md)
    format: str = "gpt"
    # sft: several conversations per row (attention never crosses them); false = one per row
    pack: bool = True


@dataclass
class TokenizerConfig:
    # a Hugging Face tokenizer folder; its mask token must equal model.mask_token_id
    path: Optional[str] = None


@dataclass
class TrainConfig:
    max_steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_length: int = 128
    seed: int = 1234
    lr: float = 3e-4
    min_lr: float = 0.0
    # "wsd" (warmup, stable, decay), "cosine", "constant"
    lr_schedule: str = "cosine"
    lr_warmup_steps: int = 0
    # length of the schedule; None = train.max_steps at the first start. It is stored in the run
    # dir then, so raising train.max_steps later extends training without rewriting past LRs.
    lr_schedule_steps: Optional[int] = None
    # WSD: fraction of the schedule spent decaying at the end
    lr_decay_fraction: float = 0.2
    # WSD decay shape: "linear", "cosine", "minus_sqrt", "exponential"
    lr_decay_style: str = "linear"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # "bf16" (autocast, fp32 master weights and grads) or "fp32"; "auto": bf16 on CUDA, fp32 on CPU
    precision: str = "auto"
    # deterministic kernels on CUDA (torch deterministic mode, cuBLAS workspace, no cuDNN attention,
    # TE without non-deterministic algorithms): bit-exact repeats and resumes on the same GPU type
    # and software; slower. CPU training is deterministic either way (docs/checkpointing.md)
    deterministic: bool = False
    log_interval: int = 1
    # a step whose loss or gradient norm is not finite is skipped (counted as skipped_steps);
    # this many in a row abort the run (its checkpoints stay as they are)
    max_consecutive_skipped_steps: int = 10
    eval_interval: int = 0
    eval_iters: int = 4
    # print a greedy AR sample of this many tokens at the end (0 = off)
    sample_tokens: int = 0
    sample_prompt: str = "ROMEO:"
    # at the end, decode these prompts in all four modes and print TPF / tokens/s (TP = 1 only)
    decode_prompts: List[str] = field(default_factory=list)
    decode_tokens: int = 64
    # diffusion rows of that table: one per confidence threshold (a small model is rarely 90 % sure)
    decode_thresholds: List[float] = field(default_factory=lambda: [0.9])
    # or decode the first decode_task_limit problems of this nld-eval task (its prompts; its answer
    # check adds an accuracy column), in batches of decode_batch_size (the demo_math recipe)
    decode_task: Optional[str] = None
    decode_task_limit: int = 32
    decode_batch_size: int = 8
    # the table's tokens/s: the median of this many timed decodes per mode, modes alternating (0: none)
    decode_repeats: int = 3
    # print the plan (parameters, memory per GPU, FLOPs, steps, time) for `nodes` x `gpus_per_node`
    # GPUs and exit without training; a layout that cannot fit is refused (exit 2). See docs/slurm.md
    dry_run: bool = False
    # dense bf16 peak TFLOP/s per GPU, the MFU denominator of the trainer's metrics, the planner's
    # time estimate and the benches; None = detected from the GPU's name (a table of exact names:
    # nld_train.observability.PEAK_BF16_TFLOPS); unknown GPUs and MIG slices get no MFU
    peak_tflops: Optional[float] = None


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 = only at the end
    save_final: bool = True
    keep_last: int = 3
    # also keep every checkpoint whose step is a multiple of this (0 = none beyond keep_last)
    keep_every: int = 0
    # write in the background (megatron AsyncCallsQueue) and commit at a later step boundary
    async_save: bool = False
    # weights-only initialisation (new optimizer, step 0): a run dir, a step dir or a checkpoints/
    init_from: Optional[str] = None


@dataclass
class RunConfig:
    dir: str = "runs/default"
    # resuming with a different value of a key that changes the math (model, objective, data,
    # seed, global batch, optimizer, schedule) is refused unless this is true
    allow_config_change: bool = False


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "nld-train"
    name: Optional[str] = None


@dataclass
class EvalConfig:
    """Benchmarks during training (nld_train.eval, docs/evaluation.md): every ``interval`` steps,
    rank 0 evaluates the just-trained weights; results go to metrics.jsonl / wandb as
    ``eval/<task>/<mode>/<accuracy|tpf|tokens_per_s>`` and to run.dir/eval/step_<8 digits>/."""
    interval: int = 0  # 0 = never
    tasks: List[str] = field(default_factory=lambda: ["gsm8k"])
    modes: List[str] = field(default_factory=lambda: ["ar", "diffusion", "linear_spec"])
    thresholds: List[float] = field(default_factory=lambda: [0.9])
    limit: int = 32
    batch_size: int = 8
    max_new_tokens: Optional[int] = None  # None = each task's default
    prompt_format: str = "auto"           # auto | fewshot | chat
    sol: bool = False


@dataclass
class StageConfig:
    name: str = ""    # sub-folder of run.dir
    recipe: str = ""  # the recipe this stage runs


@dataclass
class AddonConfig:
    # "" = train the LM itself (stages, SFT); "sampler" / "lora_drafter" = train that add-on of a
    # frozen LM (recipes sampler / lora_drafter; docs/addons.md)
    kind: str = ""
    # the frozen LM: a run dir or step dir of an nld-train checkpoint
    base_model: Optional[str] = None
    # the last fraction of data.path's documents is held out (measurements), the rest feeds data generation
    holdout_fraction: float = 0.1
    # data-generation batch (rows decoded together)
    gen_batch_size: int = 32
    # also put the trained artifact next to the model (<base run dir>/sampler or /linear_spec_lora),
    # where load-time users and `nld-convert to-hf` find it
    install: bool = True


@dataclass
class SamplerConfig:
    # "correct" for the label: "ar" = the LM's top-1 equals its own greedy AR continuation (spec),
    # "ground_truth" = equals the training text
    label: str = "ar"
    num_sequences: int = 256          # training windows denoised for the data
    prompt_length: int = 32
    num_blocks: int = 2               # blocks denoised per window (context teacher-forced)
    block_length: int = 32
    # behaviour policy while recording: per block, a confidence threshold drawn from this list
    behaviour_thresholds: List[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.97, 1.0])
    # where the shards go; None = <run.dir>/sampler_data (generated unless it already holds them)
    data_dir: Optional[str] = None
    # model (spec defaults)
    token_dim: int = 32
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 8
    ffn_hidden_size: int = 384


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: float = 512.0
    # "ce": cross-entropy on the verifier's greedy tokens (spec); "kl": KL(verifier || drafter)
    loss: str = "ce"
    num_sequences: int = 256          # self-generated responses (greedy AR of the frozen LM)
    prompt_length: int = 32
    response_length: int = 96
    drafts_per_sequence: int = 4      # draft blocks per response, at random offsets
    block_length: int = 32
    data_dir: Optional[str] = None    # None = <run.dir>/lora_data


@dataclass
class PlanConfig:
    """Assumptions of the dry-run planner (train.dry_run=true), one GPU kind for the whole job."""
    gpu_memory_gb: float = 80.0    # H100 SXM: 80 GB HBM3
    # memory the plan keeps free: CUDA context, NCCL buffers, allocator fragmentation
    reserve_gb: float = 8.0
    # the peak per GPU is train.peak_tflops (one key for trainer, planner and benches)
    # model FLOPs utilisation of the computation; the data-parallel communication that overlap does
    # not hide is added on top (nld_train/plan.py)
    mfu: float = 0.40
    # all-reduce bus bandwidth per GPU, GB/s: inside a node (H100 SXM NVLink 4: 450 GB/s per
    # direction, ~80 % reached) and across nodes (one 400 Gb/s NIC per GPU, ~80 % reached)
    intra_node_gb_per_s: float = 360.0
    inter_node_gb_per_s: float = 40.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    addon: AddonConfig = field(default_factory=AddonConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # name of the recipe this config came from (set by the CLI)
    recipe: str = ""
    # a multi-stage recipe: names of recipes run one after another in run.dir/<name>, each
    # stage initialised from the previous one's final checkpoint; empty = a single stage
    pipeline: List[StageConfig] = field(default_factory=list)
    # the job's size for train.dry_run (a real run takes its world size from the launcher)
    nodes: int = 1
    gpus_per_node: int = 8
    plan: PlanConfig = field(default_factory=PlanConfig)


# parallel.recompute_modules allowed for this dense model (megatron-core's names)
RECOMPUTE_MODULES = ("core_attn", "mlp")


def _fail(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def _choice(key: str, value, allowed):
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {sorted(allowed)}")


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Vocabulary rounded up so every tensor-parallel rank holds an equal, aligned shard."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "kv_channels", "vocab_size")


def model_shape(model: ModelConfig, tp: int) -> dict:
    """What a checkpoint's tensors depend on: the shape keys and the padded vocabulary (it grows in
    multiples of 128 x TP, so a checkpoint saved at one TP loads at another only if this matches).
    Stored in every checkpoint marker and compared on load."""
    return {**{k: getattr(model, k) for k in SHAPE_KEYS}, "padded_vocab_size": padded_vocab_size(model, tp)}


def model_config_from_dict(d: dict) -> ModelConfig:
    """A saved ``model`` config dict -> ModelConfig; keys this version does not know are dropped
    (a checkpoint written by a newer nld-train still loads)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    rs = kw.get("rope_scaling") or {}
    rs_known = {f.name for f in dataclasses.fields(RopeScalingConfig)}
    kw["rope_scaling"] = RopeScalingConfig(**{k: v for k, v in rs.items() if k in rs_known})
    return ModelConfig(**kw)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check what types cannot: every error names the offending key."""
    m, o, p, t, c = cfg.model, cfg.objective, cfg.parallel, cfg.train, cfg.checkpoint
    if not cfg.pipeline and not cfg.train.dry_run:  # a dry run reads no data
        if cfg.data.path in (None, "", []):
            _fail("data.path", "is required (an indexed-shard prefix or a blend), e.g. data.path=/data/corpus_text_document")
        if not cfg.tokenizer.path:
            _fail("tokenizer.path", "is required (a Hugging Face tokenizer folder)")
    for key, val in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                     ("model.num_attention_heads", m.num_attention_heads),
                     ("model.num_query_groups", m.num_query_groups),
                     ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size),
                     ("train.max_steps", t.max_steps), ("train.global_batch_size", t.global_batch_size),
                     ("train.micro_batch_size", t.micro_batch_size), ("train.seq_length", t.seq_length),
                     ("objective.block_size", o.block_size),
                     ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
                     ("train.log_interval", t.log_interval)]:
        if val <= 0:
            _fail(key, f"must be positive, got {val}")
    if m.num_attention_heads % m.num_query_groups:
        _fail("model.num_query_groups", f"{m.num_query_groups} does not divide "
              f"model.num_attention_heads={m.num_attention_heads}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_attention_heads="
              f"{m.num_attention_heads}; set model.kv_channels")
    if not 0 <= m.mask_token_id < m.vocab_size:
        _fail("model.mask_token_id", f"{m.mask_token_id} is outside the vocabulary [0, {m.vocab_size})")
    _choice("model.rope_scaling.type", m.rope_scaling.type, {"none", "yarn"})
    if m.rope_scaling.type == "yarn" and (m.rope_scaling.factor <= 1
                                          or m.rope_scaling.original_max_position_embeddings <= 0):
        _fail("model.rope_scaling", "yarn needs factor > 1 and original_max_position_embeddings > 0")
    if m.rope_scaling.mscale != m.rope_scaling.mscale_all_dim:
        _fail("model.rope_scaling.mscale", "mscale != mscale_all_dim (an attention factor != 1) is not supported")
    if m.query_scaling_beta and m.rope_scaling.original_max_position_embeddings <= 0:
        _fail("model.query_scaling_beta", "needs model.rope_scaling.original_max_position_embeddings > 0")
    _choice("model.attention_backend", m.attention_backend, {"auto", "sdpa", "flex"})
    _choice("objective.loss_normalization", o.loss_normalization, {"combined", "separate", "per_microbatch"})
    if o.alpha < 0:
        _fail("objective.alpha", f"must be >= 0, got {o.alpha}")
    if o.ar_weight < 0:
        _fail("objective.ar_weight", f"must be >= 0, got {o.ar_weight}")
    if not 0 < o.noise_eps < 1:
        _fail("objective.noise_eps", f"must be in (0, 1), got {o.noise_eps}")

    tp = p.tensor_model_parallel_size
    if world_size % tp:
        _fail("parallel.tensor_model_parallel_size", f"{tp} does not divide the world size {world_size}")
    if m.num_attention_heads % tp:
        _fail("parallel.tensor_model_parallel_size",
              f"{tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups % tp:
        _fail("parallel.tensor_model_parallel_size",
              f"{tp} does not divide model.num_query_groups={m.num_query_groups}")
    if m.ffn_hidden_size % tp:
        _fail("parallel.tensor_model_parallel_size", f"{tp} does not divide model.ffn_hidden_size")
    if p.sequence_parallel and tp == 1:
        _fail("parallel.sequence_parallel", "needs parallel.tensor_model_parallel_size > 1")
    if p.sequence_parallel and t.seq_length % tp:
        _fail("parallel.sequence_parallel", f"train.seq_length={t.seq_length} is not divisible by TP={tp}")
    _choice("parallel.backend", p.backend, {"auto", "gloo", "nccl"})
    if p.timeout_minutes <= 0:
        _fail("parallel.timeout_minutes", f"must be positive, got {p.timeout_minutes}")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size <= 0:
        _fail("parallel.ddp_bucket_size", f"must be positive (parameters per bucket) or null, got {p.ddp_bucket_size}")
    if p.ddp_bucket_size is not None and p.overlap_grad_reduce is False:
        _fail("parallel.ddp_bucket_size", "buckets exist only with parallel.overlap_grad_reduce (megatron "
              "reduces all gradients in one call without it)")
    _choice("parallel.recompute", p.recompute, {"none", "selective", "full"})
    if p.recompute == "selective":
        if not p.recompute_modules:
            _fail("parallel.recompute_modules", "must name at least one module for parallel.recompute=selective")
        for mod in p.recompute_modules:
            _choice("parallel.recompute_modules", mod, set(RECOMPUTE_MODULES))
    dp = world_size // tp
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail("train.global_batch_size", f"{t.global_batch_size} is not divisible by "
              f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})")
    if t.seq_length > m.max_position_embeddings:
        _fail("train.seq_length", f"{t.seq_length} exceeds model.max_position_embeddings="
              f"{m.max_position_embeddings}")
    if t.decode_prompts and t.decode_task:
        _fail("train.decode_task", "set either train.decode_prompts or train.decode_task, not both")
    for key in ("decode_task_limit", "decode_batch_size"):
        if getattr(t, key) <= 0:
            _fail(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    if t.decode_repeats < 0:
        _fail("train.decode_repeats", f"must be >= 0, got {t.decode_repeats}")
    if (t.decode_prompts or t.decode_task) and (t.decode_tokens <= 0 or t.decode_tokens % o.block_size):
        _fail("train.decode_tokens", f"must be a positive multiple of objective.block_size={o.block_size}")
    if not t.decode_thresholds or any(not 0 < x <= 1 for x in t.decode_thresholds):
        _fail("train.decode_thresholds", f"must be a non-empty list of values in (0, 1], got {t.decode_thresholds}")
    _choice("train.lr_schedule", t.lr_schedule, {"wsd", "cosine", "constant"})
    _choice("train.lr_decay_style", t.lr_decay_style, {"linear", "cosine", "minus_sqrt", "exponential"})
    _choice("train.precision", t.precision, {"auto", "bf16", "fp32"})
    if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr:
        _fail("train.min_lr", f"need 0 <= train.min_lr <= train.lr, got {t.min_lr} and {t.lr}")
    if t.lr_schedule_steps is not None and t.lr_schedule_steps < 1:
        _fail("train.lr_schedule_steps", "must be positive")
    if t.lr_warmup_steps < 0:
        _fail("train.lr_warmup_steps", "must be >= 0")
    if not 0 <= t.lr_decay_fraction <= 1:
        _fail("train.lr_decay_fraction", "must be in [0, 1]")
    if c.interval < 0:
        _fail("checkpoint.interval", f"must be >= 0, got {c.interval}")
    if c.keep_last < 1:
        _fail("checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    if c.keep_every < 0:
        _fail("checkpoint.keep_every", f"must be >= 0, got {c.keep_every}")
    if t.max_consecutive_skipped_steps < 1:
        _fail("train.max_consecutive_skipped_steps", "must be >= 1")
    _choice("wandb.mode", cfg.wandb.mode, {"offline", "online", "disabled"})
    if cfg.eval.interval < 0:
        _fail("eval.interval", f"must be >= 0, got {cfg.eval.interval}")
    # eval.tasks/modes/...: checked by nld_train.eval.settings, which the layers put above config;
    # nld_train.cli.load_config calls it right after this function
    positive = [("nodes", cfg.nodes), ("gpus_per_node", cfg.gpus_per_node), ("plan.gpu_memory_gb", cfg.plan.gpu_memory_gb),
                ("plan.intra_node_gb_per_s", cfg.plan.intra_node_gb_per_s),
                ("plan.inter_node_gb_per_s", cfg.plan.inter_node_gb_per_s)]
    if t.peak_tflops is not None:
        positive.append(("train.peak_tflops", t.peak_tflops))
    for key, val in positive:
        if val <= 0:
            _fail(key, f"must be positive, got {val}")
    if not 0 < cfg.plan.mfu <= 1:
        _fail("plan.mfu", f"must be in (0, 1], got {cfg.plan.mfu}")
    if not 0 <= cfg.plan.reserve_gb < cfg.plan.gpu_memory_gb:
        _fail("plan.reserve_gb", f"must be in [0, plan.gpu_memory_gb), got {cfg.plan.reserve_gb}")
    _choice("data.format", cfg.data.format, {"gpt", "sft"})
    _validate_addon(cfg)


def _validate_addon(cfg: Config) -> None:
    a, s, lo = cfg.addon, cfg.sampler, cfg.lora
    _choice("addon.kind", a.kind, {"", "sampler", "lora_drafter"})
    if not a.kind:
        return
    if not a.base_model:
        _fail("addon.base_model", f"is required for addon.kind={a.kind} (the frozen LM's run dir or step dir)")
    if not 0 < a.holdout_fraction < 1:
        _fail("addon.holdout_fraction", "must be in (0, 1)")
    for key, val in [("addon.gen_batch_size", a.gen_batch_size), ("sampler.num_sequences", s.num_sequences),
                     ("sampler.prompt_length", s.prompt_length), ("sampler.num_blocks", s.num_blocks),
                     ("sampler.block_length", s.block_length), ("sampler.d_model", s.d_model),
                     ("sampler.num_layers", s.num_layers), ("sampler.num_heads", s.num_heads),
                     ("sampler.ffn_hidden_size", s.ffn_hidden_size), ("sampler.token_dim", s.token_dim),
                     ("lora.rank", lo.rank), ("lora.num_sequences", lo.num_sequences),
                     ("lora.prompt_length", lo.prompt_length), ("lora.response_length", lo.response_length),
                     ("lora.drafts_per_sequence", lo.drafts_per_sequence), ("lora.block_length", lo.block_length)]:
        if val <= 0:
            _fail(key, f"must be positive, got {val}")
    _choice("sampler.label", s.label, {"ar", "ground_truth"})
    if not s.behaviour_thresholds or any(not 0 <= x <= 1 for x in s.behaviour_thresholds):
        _fail("sampler.behaviour_thresholds", f"must be a non-empty list of values in [0, 1], got {s.behaviour_thresholds}")
    if s.d_model % s.num_heads or (s.d_model // s.num_heads) % 2:
        _fail("sampler.d_model", f"{s.d_model} must split into sampler.num_heads={s.num_heads} heads of even size")
    _choice("lora.loss", lo.loss, {"ce", "kl"})
    if lo.alpha <= 0:
        _fail("lora.alpha", f"must be positive, got {lo.alpha}")
    if lo.block_length < 2 or lo.block_length > lo.response_length:
        _fail("lora.block_length", f"must be in [2, lora.response_length={lo.response_length}]")


# Keys that may differ between a checkpoint and the run resuming it: they change how the run is
# laid out, logged or saved, not what it computes. Prefixes end with ".".
FREE_ON_RESUME = ("train.max_steps", "train.micro_batch_size", "train.log_interval", "train.eval_interval",
                  "train.eval_iters", "train.sample_tokens", "train.sample_prompt", "train.decode_prompts",
                  "train.decode_tokens", "train.decode_thresholds", "train.decode_task", "train.decode_task_limit",
                  "train.decode_batch_size", "train.decode_repeats",
                  "train.max_consecutive_skipped_steps", "model.attention_backend", "data.cache_dir",
                  "parallel.", "checkpoint.", "run.", "wandb.", "eval.", "recipe", "pipeline",
                  "train.dry_run", "train.peak_tflops", "train.deterministic", "nodes", "gpus_per_node", "plan.")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict -> ``{"train.lr": ..., ...}`` (the keys users type)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def math_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose value differs between a checkpoint's config and the current one and that change
    the math of training (``[]`` when resuming is safe). Keys the checkpoint does not know (added
    in a later version) are not compared."""
    a, b = flatten(saved), flatten(current)
    free = [k for k in FREE_ON_RESUME
            # the micro-batch size is free only because normalisation is global
            if not (k == "train.micro_batch_size" and b.get("objective.loss_normalization") == "per_microbatch")]
    def is_free(key):
        return any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)
    return [k for k in sorted(b) if k in a and a[k] != b[k] and not is_free(k)]
