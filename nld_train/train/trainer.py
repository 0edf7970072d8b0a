"""The training loop: one loop for every stage (AR, joint, SFT); the objective decides the math.

A step, top to bottom:
1. fetch this rank's micro-batches by *global sample index* (step · global_batch + offset), so the
   data order and the diffusion noise do not depend on the parallel layout or on resumes;
2. let the objective prepare every micro-batch (noise first) and all-reduce the token counts
   (N_AR, N_masked) over data-parallel ranks: the normaliser of the *whole global batch*;
3. forward/backward each micro-batch with its loss already divided by those global counts;
   megatron DDP sums gradients (``calculate_per_token_loss=True``: no 1/DP) and
   ``finalize_model_grads`` is called without ``num_tokens`` (no second division);
4. TP-aware clip, AdamW, log, checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from nld_train import checkpoint as ckpt
from nld_train.config import Config, ConfigError, flatten, math_changes, model_shape, validate
from nld_train.data import (
    MegatronTokenizer,
    build_datasets,
    check_data,
    check_mask_token,
    describe,
    get_samples,
    load_tokenizer,
)
from nld_train.dist import apply_determinism, capabilities, init_distributed, on_rank0
from nld_train.errors import DataError
from nld_train.model.gpt import build_model
from nld_train.objective import objective_from_config
from nld_train.observability import (
    MetricsLog,
    Wandb,
    progress_line,
    provenance,
    resolve_peak_flops,
    train_flops_per_token,
)
from nld_train.train.optim import build_optimizer, grad_norm_and_clip
from nld_train.train.preemption import EXIT_PREEMPTED, Preempted, Preemption
from nld_train.train.schedule import lr_at


class Trainer:
    def __init__(self, cfg: Config, eval_hook: Optional[Callable[["Trainer"], dict]] = None):
        """``eval_hook(trainer) -> metrics`` runs every ``eval.interval`` steps on rank 0 (the nld-train
        CLI passes :func:`nld_train.eval.hook.eval_during_training`; the trainer knows no benchmark)."""
        if cfg.eval.interval and eval_hook is None:
            raise ConfigError(f"eval.interval={cfg.eval.interval} needs an eval hook: pass "
                              "Trainer(cfg, eval_hook=nld_train.eval.hook.eval_during_training) as nld-train does")
        self.cfg, t = cfg, cfg.train
        # before anything touches cuBLAS (it reads its workspace setting once)
        self.determinism = apply_determinism(t.deterministic)
        self.eval_hook = eval_hook
        self.layout = init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.backend,
                                       cfg.parallel.timeout_minutes, seed=t.seed)
        validate(cfg, self.layout.world_size)
        self.caps = capabilities()
        self.device = torch.device(self.caps.device)
        self.rank0 = self.layout.rank == 0
        self.run_dir = Path(cfg.run.dir)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise DataError(f"tokenizer {cfg.tokenizer.path} has {len(self.tokenizer)} tokens but "
                             f"model.vocab_size is {cfg.model.vocab_size}")
        check_mask_token(self.tokenizer, cfg.model.mask_token_id)
        # before the (possibly large) model is built: intact files, the same vocabulary, loss masks iff SFT
        data_summary = check_data(cfg.data.path, self.tokenizer, cfg.data.format)
        self.log(describe(data_summary, cfg.data.format, t.max_steps * t.global_batch_size * t.seq_length))

        self.model = build_model(cfg.model, cfg.parallel, t.seq_length, t.seed)
        par = cfg.parallel
        # parallel.overlap_grad_reduce (null: with CUDA): buckets are all-reduced during backward
        self.overlap_grad_reduce = self.caps.cuda if par.overlap_grad_reduce is None else par.overlap_grad_reduce
        if par.ddp_bucket_size is not None and not self.overlap_grad_reduce:
            raise ConfigError("parallel.ddp_bucket_size: buckets exist only with parallel.overlap_grad_reduce, "
                              f"which is off on {self.caps.device} unless set to true")
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=self.overlap_grad_reduce,
            bucket_size=par.ddp_bucket_size), self.model)
        self.params = [p for p in self.ddp.parameters() if p.requires_grad]
        # parallel.distributed_optimizer: the AdamW state split over the data-parallel ranks (ZeRO-1)
        self.optimizer = build_optimizer(self.ddp, t, self._dp_group() if cfg.parallel.distributed_optimizer else None)
        if cfg.parallel.distributed_optimizer:
            ckpt.check_shardable_optimizer_state(self.model, self.optimizer)
        self.objective = objective_from_config(cfg)
        self.precision = ("bf16" if self.caps.cuda else "fp32") if t.precision == "auto" else t.precision

        # resume (full state) takes precedence over init_from (weights only)
        self.step, self.schedule_steps = 0, t.lr_schedule_steps or t.max_steps
        latest = ckpt.find_latest(self.run_dir)
        shape = model_shape(cfg.model, self.layout.tp)
        # megatron's sample order depends on how many samples the dataset is built for: keep the
        # count of the first start unless the run now needs more (then the order is rebuilt)
        self.train_samples = max(t.max_steps, self.schedule_steps) * t.global_batch_size
        self.skipped_steps = self.consecutive_skips = 0
        self.resumed = latest is not None
        if latest is not None:
            self._check_config_change(ckpt.read_meta(latest), latest)
            meta = ckpt.load(latest, self.model, self.optimizer, model_shape=shape)
            self.step, self.skipped_steps = meta["step"], meta.get("skipped_steps", 0)
            self.consecutive_skips = meta.get("consecutive_skips", 0)
            self.schedule_steps = t.lr_schedule_steps or meta["lr_schedule_steps"]
            needed = max(t.max_steps, self.schedule_steps) * t.global_batch_size
            if needed > meta["train_samples"]:
                self.log(f"warning: the run now needs {needed} samples, more than the {meta['train_samples']} "
                          "its data order was built for; megatron rebuilds the sample order")
            self.train_samples = max(needed, meta["train_samples"])
            self.log(f"resumed from {latest} at step {self.step}")
        elif cfg.checkpoint.init_from:
            src = ckpt.resolve(cfg.checkpoint.init_from)
            ckpt.load(src, self.model, None, model_shape=shape)
            self.log(f"initialised weights from {src}")

        n_valid = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data, MegatronTokenizer(self.tokenizer), t.seq_length, self.train_samples, n_valid, t.seed,
            cfg.data.cache_dir or str(self.run_dir / "data_cache"), self.objective.data_alignment)

        self.metrics = MetricsLog(self.run_dir, self.step) if self.rank0 else None
        if self.rank0:
            from omegaconf import OmegaConf
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            import json
            (self.run_dir / "provenance.json").write_text(
                json.dumps(provenance(self.layout, self.caps), indent=1))
        self.wandb = Wandb(cfg.wandb, self.run_dir, asdict(cfg), cfg.recipe) if self.rank0 else None
        self.async_queue = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self.async_queue = AsyncCallsQueue(persistent=False)  # persistent workers need CUDA
        self.preemption = Preemption()
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_length, self.objective, self.layout.tp)
        # MFU denominator: train.peak_tflops, else the detected bf16 peak; none rather than a wrong one
        self.peak_flops, self.peak_source = resolve_peak_flops(t.peak_tflops, self.precision == "bf16")

    def _check_config_change(self, meta: dict, path) -> None:
        """Resuming with other math (model, objective, data, seed, batch, optimizer, schedule) is
        refused, naming the keys, unless run.allow_config_change=true."""
        changed = math_changes(meta.get("config", {}), asdict(self.cfg))
        if not changed:
            return
        old, new = flatten(meta["config"]), flatten(asdict(self.cfg))
        what = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        if not self.cfg.run.allow_config_change:
            raise ConfigError(f"run dir {self.run_dir} holds checkpoint {path} trained with another config "
                              f"({what}); use another run.dir, or run.allow_config_change=true to resume anyway")
        self.log(f"warning: resuming {path} with changed config ({what})")

    # -------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank0:
            print(msg, flush=True)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.caps.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self, dataset, step: int):
        """This rank's micro-batches of global batch ``step``: lists of global sample indices."""
        t, lay = self.cfg.train, self.layout
        per_rank = t.global_batch_size // lay.dp
        first = step * t.global_batch_size + lay.dp_rank * per_rank
        for start in range(first, first + per_rank, t.micro_batch_size):
            idx = list(range(start, start + t.micro_batch_size))
            b = get_samples(dataset, idx)
            packed = ("document_ids", "position_ids") if "document_ids" in b else ()  # SFT rows
            yield idx, {k: b[k].to(self.device) for k in ("tokens", "labels", "loss_mask", *packed)}

    def _prepare(self, dataset, step: int):
        preps = [self.objective.prepare(b["tokens"], b["labels"], b["loss_mask"], idx,
                                        b.get("document_ids"), b.get("position_ids"))
                 for idx, b in self._micro_batches(dataset, step)]
        # the normaliser: token counts of the whole global batch (all micro-batches, all DP ranks)
        counts = torch.stack([sum(p.n_ar for p in preps), sum(p.n_diff for p in preps)]).float()
        dist.all_reduce(counts, group=self._dp_group())
        return preps, counts

    def _dp_group(self):
        return ps.get_data_parallel_group()

    def _forward(self, prep):
        """Per-token cross-entropy [b, S] for one prepared micro-batch."""
        L, bs = self.cfg.train.seq_length, self.cfg.objective.block_size
        if prep.document_ids is not None:  # packed SFT rows: this micro-batch's masks
            attn = self.model.packed_attention_inputs(prep.attention, prep.document_ids, prep.position_ids, bs)
        else:
            attn = self.model.attention_inputs(prep.attention, L, bs, self.device)
        with self._autocast():
            return self.ddp(prep.input_ids, prep.position_ids, attn, labels=prep.targets)

    def forward_backward(self, step: int):
        """Gradients of global batch ``step`` in ``main_grad`` (reduced over DP); returns the
        global loss sums [S_AR, S_diff] and counts [N_AR, N_masked]."""
        preps, counts = self._prepare(self.train_ds, step)
        n_micro_total = len(preps) * self.layout.dp
        self.ddp.zero_grad_buffer()
        sums = torch.zeros(2, device=self.device)
        for i, prep in enumerate(preps):
            # megatron counts a gradient as ready for its bucket's all-reduce only outside no_sync:
            # with parallel.overlap_grad_reduce the buckets go out during the last backward
            with contextlib.nullcontext() if i == len(preps) - 1 else self.ddp.no_sync():
                s_ar, s_diff = self.objective.sums(self._forward(prep), prep)
                self.objective.loss(s_ar, s_diff, prep, counts, n_micro_total).backward()
            sums += torch.stack([s_ar.detach(), s_diff.detach()]).float()
        finalize_model_grads([self.ddp], num_tokens=None)  # DP all-reduce (sum) or its wait, SP norm grads
        dist.all_reduce(sums, group=self._dp_group())
        return sums, counts

    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        sums, counts = self.forward_backward(step)
        grad_norm = grad_norm_and_clip(self.params, t.clip_grad)
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, schedule=t.lr_schedule, warmup=t.lr_warmup_steps,
                   total=self.schedule_steps, decay_fraction=t.lr_decay_fraction, decay_style=t.lr_decay_style)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        rep = self.objective.reported_losses(sums[0], sums[1], counts[0], counts[1])
        # every rank sees the same all-reduced loss and norm, so all skip (or not) together
        if math.isfinite(grad_norm) and math.isfinite(rep["loss"]):
            for p in self.params:
                p.grad = p.main_grad
            self.optimizer.step()
            for p in self.params:
                p.grad = None  # never leave .grad aliased to main_grad: the next backward would count twice
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.log(f"step {step + 1}: non-finite loss {rep['loss']} or grad norm {grad_norm}: update skipped "
                      f"({self.consecutive_skips} in a row)")
            if self.consecutive_skips >= t.max_consecutive_skipped_steps:
                raise RuntimeError(f"{self.consecutive_skips} consecutive steps with a non-finite loss or "
                                   f"gradient (train.max_consecutive_skipped_steps); checkpoints are left as they are")
        return {"loss": rep["loss"], "loss_ar": rep["loss_ar"], "loss_diff": rep.get("loss_diff"),
                "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.skipped_steps}

    @torch.no_grad()
    def evaluate(self) -> dict:
        t = self.cfg.train
        sums, counts_all = torch.zeros(2, device=self.device), torch.zeros(2, device=self.device)
        self.ddp.eval()
        for it in range(t.eval_iters):
            preps, counts = self._prepare(self.valid_ds, it)
            for prep in preps:
                s_ar, s_diff = self.objective.sums(self._forward(prep), prep)
                sums += torch.stack([s_ar, s_diff]).float()
            counts_all += counts
        self.ddp.train()
        dist.all_reduce(sums, group=self._dp_group())
        rep = self.objective.reported_losses(sums[0], sums[1], counts_all[0], counts_all[1])
        return {f"val_{k}": v for k, v in rep.items() if v is not None}

    def save(self, sync: bool = False) -> None:
        c = self.cfg.checkpoint
        meta = {"lr_schedule_steps": self.schedule_steps, "train_samples": self.train_samples,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "config": asdict(self.cfg),
                "consumed_samples": self.step * self.cfg.train.global_batch_size,
                "model_shape": model_shape(self.cfg.model, self.layout.tp),
                "objective": self.cfg.objective.name,
                "tensor_model_parallel_size": self.layout.tp, "recipe": self.cfg.recipe}
        t0 = time.time()
        queue = self.async_queue if (c.async_save and not sync) else None
        if self.async_queue is not None:  # one save in flight at a time
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        path = ckpt.save(self.run_dir, self.step, self.model, self.optimizer, meta, c.keep_last, c.keep_every,
                         async_queue=queue)
        self.log(f"{'scheduled async' if queue else 'saved'} checkpoint {path} ({time.time() - t0:.1f}s blocking)")

    def fit(self) -> None:
        t, c = self.cfg.train, self.cfg.checkpoint
        self.ddp.train()
        tokens_per_step = t.global_batch_size * t.seq_length
        # a resumed run's current step is already on disk: never save the same step twice
        start_step, t_start = self.step, time.time()
        saved_at = self.step if self.resumed else None
        self.log(f"training {self.cfg.recipe or 'run'}: objective={self.cfg.objective.name} steps "
                  f"{self.step}->{t.max_steps} world={self.layout.world_size} (tp={self.layout.tp}, "
                  f"dp={self.layout.dp}{', optimizer state sharded over dp' if self.cfg.parallel.distributed_optimizer else ''}) device={self.caps.device} te={self.caps.transformer_engine} "
                  f"apex={self.caps.apex} precision={self.precision} "
                  f"deterministic={'on (' + ', '.join(self.determinism) + ')' if self.determinism else 'off'} "
                  f"mfu={'vs %.0f TFLOP/s/GPU (%s)' % (self.peak_flops / 1e12, self.peak_source) if self.peak_flops else 'off: ' + self.peak_source} "
                  f"run_dir={self.run_dir}")
        while self.step < t.max_steps:
            t0 = time.time()
            row = self.train_step(self.step)
            self.step += 1
            dt = time.time() - t0
            row = {"step": self.step, **row, "tokens": self.step * tokens_per_step,
                   "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
            if self.peak_flops:
                row["mfu"] = self.flops_per_token * row["tokens_per_s"] / (self.peak_flops * self.layout.world_size)
            if t.eval_interval and self.step % t.eval_interval == 0:
                row.update(self.evaluate())
            if self.cfg.eval.interval and self.step % self.cfg.eval.interval == 0:
                # benchmarks (docs/evaluation.md): rank 0 evaluates; the others wait outside any
                # collective, so no process-group timeout bounds the eval's length
                row.update(on_rank0(lambda: self.eval_hook(self)) or {})
            if self.rank0:
                self.metrics.write(row)
                self.wandb.log(row)
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    done = self.step - start_step
                    eta = (time.time() - t_start) / done * (t.max_steps - self.step)
                    print(progress_line(row, t.max_steps, eta), flush=True)
            if self.async_queue is not None:
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            if c.interval and self.step % c.interval == 0:
                self.save()
                saved_at = self.step
            if self.preemption.requested(self.device):
                if saved_at != self.step:
                    self.save(sync=True)
                self.finish_saves()
                self.log(f"preempted ({self.preemption.received or 'signal on another rank'}): "
                          f"checkpoint at step {self.step} committed, exiting with code {EXIT_PREEMPTED}")
                raise Preempted(self.step, self.preemption.received)
        if c.save_final and self.step > start_step and saved_at != self.step:
            self.save(sync=True)
        self.finish_saves()

    def finish_saves(self) -> None:
        """Block until a background save is committed (collective)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.preemption.restore()
        if self.async_queue is not None:
            self.async_queue.close()
        if self.rank0:
            self.metrics.close()
            self.wandb.finish()

