"""Dry-run planner: ``nld-train recipe=... train.dry_run=true nodes=N [gpus_per_node=8]``.

Prints what a layout costs before it burns a cluster-week: parameters, memory per GPU, FLOPs per
token (of every registered objective: stage 1 AR, stage 2 joint; the same formula as the trainer's
MFU), steps, tokens and time for the token budget at an assumed MFU. A layout whose estimate does not fit in
``plan.gpu_memory_gb - plan.reserve_gb`` is refused (exit 2) with a layout or memory option that
would fit (distributed optimizer, recomputation, a larger TP). It imports torch (through the
objectives, which say how many tokens a sample becomes) but builds nothing on a device.

The memory model is what *this* trainer allocates on CUDA (estimates, not measurements):
- weights fp32 (4 B/param: bf16 autocast keeps fp32 parameters), gradients fp32 (4 B: megatron
  DDP buffer, grad_reduce_in_fp32), AdamW moments fp32 (8 B), none of them sharded over DP;
- activations kept for backward per layer and token (bf16 = 2 B unless noted): the two norm inputs
  on the fp32 residual stream (2 x 4h), the two norm outputs (2 x 2h), Q/K/V (2(q + 2kv)), the
  attention output (2q; flash/flex attention keep no S x S matrix), the SwiGLU inputs (2 x 2f) and
  the down-projection input (2f): 12h + 2(q+2kv) + 2q + 6f bytes; q, kv and f are split by TP, the
  h terms only with sequence parallelism; tokens per micro-batch = MBS x the objective's tokens per
  sample (L for AR, 2L for joint);
- logits: MBS x tokens x padded vocab / TP x 10 B (bf16 logits, their fp32 copy, the saved softmax);
- parallel.recompute=full: per layer only its input (4h, fp32 residual) is kept, plus one layer's
  activations alive while it is recomputed; selective with "mlp": the MLP's 6f/TP are not kept
  (one layer's worth while recomputing); "core_attn" saves nothing here (flash/flex attention keep
  no S x S matrix; it matters only on the dense CPU path);
- parallel.distributed_optimizer: the AdamW moments (8 B/param) split over DP ranks by whole
  parameters (ZeRO stage 1, torch's ZeroRedundancyOptimizer): the most loaded rank's share, from the
  same greedy assignment (at least the largest parameter); fp32 parameters are their own master
  copy, the fp32 grad buffer stays whole.

The step time is the computation at ``plan.mfu`` plus the data-parallel communication it does not
hide (``comm_per_step``; ring collectives at ``plan.intra_node_gb_per_s`` when the data-parallel
group fits in one node, else ``plan.inter_node_gb_per_s``, per GPU):
- the gradient all-reduce: 2 (DP-1)/DP x 4 B x parameters per GPU (fp32 grad buffer). Without
  parallel.overlap_grad_reduce all of it waits for the whole backward. With it (on by default on
  CUDA) megatron all-reduces each bucket as soon as the last micro-batch's backward has produced it
  (earlier micro-batches accumulate under no_sync), so only that backward (2/3 of one micro-batch's
  compute) can hide it, and never the bucket finished last, the one with the embedding
  (parallel.ddp_bucket_size, default max(40M, 1M x DP) parameters, and at least the embedding):
  exposed = max(all-reduce - that backward, the last bucket's all-reduce);
- parallel.distributed_optimizer: the updated parameters broadcast from their owners,
  (DP-1)/DP x 4 B x parameters per GPU, after the optimizer step (never overlapped).
Not modelled: pipeline parallelism (nld-train has none), the CPU path, tensor-parallel
communication (inside the layers: part of the MFU).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from nld_train.config import Config, ModelConfig, padded_vocab_size
from nld_train.objective import ARObjective, objective_class, objective_from_config, objective_names
from nld_train.observability import resolve_peak_flops, train_flops_per_token

GB = 1e9


def head_dims(m: ModelConfig) -> tuple[int, int]:
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return m.num_attention_heads * head_dim, m.num_query_groups * head_dim


def parameter_numels(m: ModelConfig, tp: int = 1) -> list[tuple[int, int, bool]]:
    """(numel, ndim, split over TP) of every parameter on one tensor-parallel rank, in the model's
    order (untied embedding and output layer; qkv bias only with model.qkv_bias; padded vocabulary)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = head_dims(m)
    vocab = padded_vocab_size(m, tp)
    norm, embedding = (h, 1, False), (vocab * h // tp, 2, True)
    layer = [norm, (h * q // tp, 2, True), ((q + 2 * kv) * h // tp, 2, True)]  # norm, proj, qkv
    layer += [((q + 2 * kv) // tp, 1, True)] if m.qkv_bias else []
    layer += [norm, (2 * f * h // tp, 2, True), (h * f // tp, 2, True)]      # norm, fc1 (gate; up), fc2
    return [embedding] + layer * m.num_layers + [norm, embedding]


def parameter_count(m: ModelConfig, tp: int = 1) -> dict:
    """Parameters of the model as nld-train builds it, in total and on one tensor-parallel rank."""
    params = parameter_numels(m, tp)
    return {"total": sum(n * (tp if split else 1) for n, _, split in params),
            "per_gpu": sum(n for n, _, _ in params), "padded_vocab": padded_vocab_size(m, tp)}


def sharded_optimizer_max_numel(m: ModelConfig, tp: int, dp: int) -> int:
    """The most parameters whose AdamW state one rank holds with parallel.distributed_optimizer:
    torch's ZeroRedundancyOptimizer gives whole parameters to ranks, per parameter group (weight
    decay: the matrices, then none: the vectors), largest first, each to the least loaded rank.
    Never less than the largest parameter (the embedding), so sharding gains less than 1/DP."""
    sizes = [0] * dp
    params = parameter_numels(m, tp)
    for group in ([n for n, d, _ in params if d >= 2], [n for n, d, _ in params if d < 2]):
        for n in sorted(group, reverse=True):
            sizes[sizes.index(min(sizes))] += n
    return max(sizes)


@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def memory_per_gpu(cfg: Config, tp: int | None = None, recompute: str | None = None,
                   distributed_optimizer: bool | None = None, recompute_modules=None) -> Memory:
    """Bytes per GPU (see the module docstring for the model). ``tp`` other than the configured size:
    what that size would need, with sequence parallelism on as in the parallel=tpN presets; the
    other arguments override parallel.recompute / distributed_optimizer / recompute_modules."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if tp is None or tp == p.tensor_model_parallel_size:
        tp, sp = p.tensor_model_parallel_size, p.sequence_parallel
    else:
        sp = tp > 1
    recompute = p.recompute if recompute is None else recompute
    modules = p.recompute_modules if recompute_modules is None else recompute_modules
    dist_opt = p.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
    dp = cfg.nodes * cfg.gpus_per_node // tp
    params = parameter_count(m, tp)["per_gpu"]
    q, kv = head_dims(m)
    h, f = m.hidden_size, m.ffn_hidden_size
    sp_div = tp if sp else 1
    per_token_layer = 12 * h / sp_div + (2 * (q + 2 * kv) + 2 * q + 6 * f) / tp
    if recompute == "full":  # layer inputs kept, one layer's activations live at a time
        kept = m.num_layers * 4 * h / sp_div + per_token_layer
    elif recompute == "selective" and "mlp" in modules:
        kept = m.num_layers * (per_token_layer - 6 * f / tp) + 6 * f / tp
    else:
        kept = m.num_layers * per_token_layer
    tokens = t.micro_batch_size * objective_from_config(cfg).tokens_per_sample(t.seq_length)
    final_norm = 4 * h / sp_div
    return Memory(weights=4 * params, grads=4 * params,
                  optimizer=8 * (sharded_optimizer_max_numel(m, tp, dp) if dist_opt else params),
                  activations=tokens * (kept + final_norm),
                  logits=tokens * padded_vocab_size(m, tp) / tp * 10)


def comm_per_step(cfg: Config, compute_s: Optional[float]) -> dict:
    """Seconds of data-parallel communication per optimizer step (module docstring for the model):
    ``grad_reduce`` (all of it), ``grad_reduce_exposed`` (what overlap leaves on the step),
    ``param_broadcast`` (distributed optimizer), ``exposed`` (what the step pays), ``overlap``,
    ``bucket`` (parameters), ``gb_per_s`` and ``inter_node``."""
    p, t, pl = cfg.parallel, cfg.train, cfg.plan
    tp = p.tensor_model_parallel_size
    dp = cfg.nodes * cfg.gpus_per_node // tp
    params = parameter_count(cfg.model, tp)["per_gpu"]
    inter_node = cfg.nodes > 1  # ranks are TP-major: a data-parallel group has a GPU in every node
    bw = (pl.inter_node_gb_per_s if inter_node else pl.intra_node_gb_per_s) * GB
    grad = 2 * (dp - 1) / dp * 4 * params / bw
    overlap = p.overlap_grad_reduce is not False  # null = on: the plan is for CUDA
    bucket = p.ddp_bucket_size or max(40_000_000, 1_000_000 * dp)
    if overlap:
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        # no compute time (no peak known): nothing assumed hidden, an upper bound
        last_backward = 2 / 3 * compute_s / micro if compute_s is not None else 0.0
        # the last bucket holds the embedding (its gradient is complete only at the end of backward)
        last_bucket = min(params, max(bucket, parameter_numels(cfg.model, tp)[0][0]))
        exposed = max(grad - last_backward, grad * last_bucket / params)
    else:
        exposed = grad
    bcast = (dp - 1) / dp * 4 * params / bw if p.distributed_optimizer else 0.0
    return {"grad_reduce": grad, "grad_reduce_exposed": exposed, "param_broadcast": bcast,
            "exposed": exposed + bcast, "overlap": overlap, "bucket": bucket, "gb_per_s": bw / GB,
            "inter_node": inter_node}


# what the refusal suggests, cheapest first: (recompute, recompute_modules, distributed_optimizer),
# each combined with what the config already sets (an option never weakens it)
_OPTIONS = [("none", [], True), ("selective", ["mlp"], False), ("selective", ["mlp"], True),
            ("full", [], False), ("full", [], True)]
_STRENGTH = {"none": 0, "selective": 1, "full": 2}


def _combined(p, rc: str, mods: list, do: bool) -> tuple[str, list, bool]:
    if _STRENGTH[p.recompute] > _STRENGTH[rc]:
        rc, mods = p.recompute, list(p.recompute_modules)
    elif rc == "selective" and p.recompute == "selective":
        mods = sorted(set(mods) | set(p.recompute_modules))
    return rc, mods, do or p.distributed_optimizer


def _overrides(p, rc: str, mods: list, do: bool) -> str:
    out = ["parallel.distributed_optimizer=true"] if do and not p.distributed_optimizer else []
    if rc != p.recompute:
        out.append(f"parallel.recompute={rc}")
    if rc == "selective" and sorted(mods) != sorted(p.recompute_modules):
        out.append(f"parallel.recompute_modules=[{','.join(mods)}]")
    return " ".join(out)


def _suggest(cfg: Config, budget: float) -> str:
    """Ways to fit: memory options at the configured TP, else the smallest TP (with options)."""
    p = cfg.parallel
    def fit(tp, rc, mods, do):
        return memory_per_gpu(cfg, tp, rc, do, mods).total / GB
    current = (p.recompute, sorted(p.recompute_modules) if p.recompute == "selective" else [], p.distributed_optimizer)
    for tp in [p.tensor_model_parallel_size] + [x for x in _tp_options(cfg) if x > p.tensor_model_parallel_size]:
        same_tp = tp == p.tensor_model_parallel_size
        if not same_tp and fit(tp, *current) <= budget:
            return f"parallel.tensor_model_parallel_size={tp} (parallel=tp{tp}) fits ({fit(tp, *current):.1f} GB)"
        for option in _OPTIONS:
            rc, mods, do = _combined(p, *option)
            if (rc, sorted(mods) if rc == "selective" else [], do) == current:
                continue  # what is already set does not fit here, and at another TP was tried above
            if fit(tp, rc, mods, do) <= budget:
                change = " ".join(filter(None, ["" if same_tp else f"parallel=tp{tp}", _overrides(p, rc, mods, do)]))
                return f"{change} fits ({fit(tp, rc, mods, do):.1f} GB)"
    return ("no tensor-parallel size up to gpus_per_node fits, even with recomputation and the distributed "
            "optimizer; lower train.micro_batch_size or train.seq_length")


def _tp_options(cfg: Config) -> list[int]:
    m = cfg.model
    return [tp for tp in (1, 2, 4, 8) if tp <= cfg.gpus_per_node and not m.num_attention_heads % tp
            and not m.num_query_groups % tp and not m.ffn_hidden_size % tp
            and (tp == 1 or not cfg.train.seq_length % tp)
            and not (cfg.nodes * cfg.gpus_per_node) % tp]


def _fmt_time(s: float) -> str:
    d, rem = divmod(s, 86400)
    return f"{int(d)} d {rem / 3600:.1f} h" if d else f"{s / 3600:.1f} h"


def plan(cfg: Config) -> tuple[str, bool]:
    """(report, fits)."""
    m, t, o, pl = cfg.model, cfg.train, cfg.objective, cfg.plan
    world = cfg.nodes * cfg.gpus_per_node
    tp = cfg.parallel.tensor_model_parallel_size
    dp = world // tp
    objective = objective_from_config(cfg)
    pc = parameter_count(m, tp)
    mem = memory_per_gpu(cfg)
    budget = pl.gpu_memory_gb - pl.reserve_gb
    fits = mem.total / GB <= budget
    f_run = train_flops_per_token(m, t.seq_length, objective, tp)
    # every registered objective with this config's settings, against plain AR (what a stage costs)
    f_ar = train_flops_per_token(m, t.seq_length, ARObjective.from_config(cfg), tp)
    flops = [(objective_class(n), train_flops_per_token(m, t.seq_length, objective_class(n).from_config(cfg), tp))
             for n in objective_names()]
    tokens_per_step = t.global_batch_size * t.seq_length
    tokens = t.max_steps * tokens_per_step
    # the peak of the GPUs planned for: train.peak_tflops, else this machine's GPU if it is known
    # (a login node without one plans no time rather than assuming a GPU)
    peak, peak_why = resolve_peak_flops(t.peak_tflops)
    compute_s = f_run * tokens_per_step / (world * peak * pl.mfu) if peak else None
    comm = comm_per_step(cfg, compute_s)
    step_s = compute_s + comm["exposed"] if peak else None
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    where = f"{'across nodes' if comm['inter_node'] else 'in one node'} at {comm['gb_per_s']:.0f} GB/s"
    if dp == 1:
        comm_line = "none (DP 1)"
    elif comm["overlap"]:
        comm_line = (f"gradient all-reduce {comm['grad_reduce']:.2f} s ({where}), overlapped with the last "
                     f"micro-batch's backward in buckets of {comm['bucket'] / 1e6:.0f} M params: "
                     f"{comm['grad_reduce_exposed']:.2f} s exposed")
    else:
        comm_line = (f"gradient all-reduce {comm['grad_reduce']:.2f} s ({where}), not overlapped "
                     f"(parallel.overlap_grad_reduce=false)")
    if dp > 1 and cfg.parallel.distributed_optimizer:
        comm_line += f"; parameter broadcast (distributed optimizer) {comm['param_broadcast']:.2f} s"
    seq = objective.describe_tokens(t.seq_length)
    lines = [
        f"plan: recipe={cfg.recipe} model={m.name} objective={o.name}" + objective.describe(),
        f"  layout      {cfg.nodes} node(s) x {cfg.gpus_per_node} GPUs = {world}; TP {tp}"
        f"{' + SP' if cfg.parallel.sequence_parallel else ''}, DP {dp}; batch {t.global_batch_size} x {t.seq_length}"
        f" = {t.micro_batch_size} x {micro} micro-batches x DP {dp}",
        f"  parameters  {pc['total'] / 1e9:.2f} B total ({2 * m.hidden_size * pc['padded_vocab'] / 1e9:.2f} B "
        f"embedding + output), {pc['per_gpu'] / 1e9:.2f} B per GPU",
        f"  memory/GPU  weights {mem.weights / GB:.1f} GB (fp32) + grads {mem.grads / GB:.1f} GB (fp32) + "
        f"Adam {mem.optimizer / GB:.1f} GB (fp32, "
        f"{f'distributed optimizer: sharded over DP {dp}, most loaded rank' if cfg.parallel.distributed_optimizer else 'not sharded'})",
        f"              + activations {mem.activations / GB:.1f} GB (micro-batch {t.micro_batch_size} x {seq} "
        f"tokens, recompute {cfg.parallel.recompute}"
        f"{' ' + ','.join(cfg.parallel.recompute_modules) if cfg.parallel.recompute == 'selective' else ''})"
        f" + logits {mem.logits / GB:.1f} GB",
        f"              = {mem.total / GB:.1f} GB of {budget:.0f} GB usable ({pl.gpu_memory_gb:.0f} GB - "
        f"{pl.reserve_gb:.0f} GB reserve): {'fits' if fits else 'DOES NOT FIT'}",
        "  FLOPs/token " + ", ".join(f"{f / 1e9:.1f} GFLOP {cls.flops_label(f / f_ar)}" for cls, f in flops)
        + "; fwd+bwd per data token, Megatron-LM counting",
        f"  budget      {t.max_steps:,} steps x {tokens_per_step:,} tokens = {tokens / 1e9:,.1f} B tokens; "
        f"{f_run * tokens:.3e} FLOPs",
        f"  DP comm     {comm_line}",
        (f"  time        {_fmt_time(step_s * t.max_steps)} at MFU {pl.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s "
         f"per GPU ({peak_why}) for the compute ({compute_s:.2f} s) + {comm['exposed']:.2f} s of communication "
         f"({step_s:.2f} s/step, {tokens_per_step / step_s / world:,.0f} tokens/s/GPU), "
         f"{step_s * t.max_steps * world / 3600:,.0f} GPU-hours" if peak else
         f"  time        not estimated: no peak TFLOP/s ({peak_why}, e.g. 989 for H100 SXM)"),
    ]
    if not fits:
        hint = _suggest(cfg, budget)
        lines.append(f"refused: {mem.total / GB:.1f} GB per GPU exceeds {budget:.0f} GB; {hint}")
    return "\n".join(lines), fits


def dry_run(cfgs: list[Config]) -> int:
    """Print the plan of every stage; 0 if all fit, 2 if any is refused."""
    rc = 0
    for cfg in cfgs:
        report, fits = plan(cfg)
        print(report, flush=True)
        if not fits:
            rc = 2
    if rc:
        print("nld-train: plan refused: the layout does not fit in GPU memory (see above)", file=sys.stderr)
    return rc
