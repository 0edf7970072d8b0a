"""The training loop: one loop for every stage (AR, joint, SFT); the objective decides the math.

A step, top to bottom:
1. fetch this rank's micro-batches by *global sample index* (step · global_batch + offset), so the
   data order and the diffusion noise do not depend on the parallel layout or on resumes;
2. let the objective prepare every micro-batch (noise first) and all-reduce the token counts
   (N_AR, N_masked) over data-parallel ranks: the normaliser of the *whole global batch*;
3. forward/backward each micro-batch with its loss already divided by those global counts;
   megatron DDP sums gradients (``calculate_per_token_loss=True``: no 1/DP) and
   ``finalize_model_grads`` is called without ``num_tokens`` (no second division);
4. TP-aware clip, AdamW, log; then the checkpoint manager decides whether to save
   (``checkpoint/manager.py``: interval, async, last step, preemption).
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
from nld_train.checkpoint.manager import CheckpointManager
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

        # resume (full state) or init_from (weights only), before the datasets: they need train_samples
        self.resumed = resumed = self._restore()  # True when this start continued a checkpoint of run.dir

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
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_length, self.objective, self.layout.tp)
        # MFU denominator: train.peak_tflops, else the detected bf16 peak; none rather than a wrong one
        self.peak_flops, self.peak_source = resolve_peak_flops(t.peak_tflops, self.precision == "bf16")
        # last, as it installs the preemption signal handlers; a resumed step is never saved again
        self.checkpointer = CheckpointManager(self.run_dir, cfg.checkpoint, self.model, self.optimizer,
                                              self.state_dict, self.device,
                                              saved_step=self.step if resumed else None, log=self.log)

    # -- the state a checkpoint carries besides weights, optimizer and RNG ------------------------
    def _restore(self) -> bool:
        """A fresh run's progress, then: resume from the newest checkpoint in run.dir (weights,
        optimizer, RNG, progress), or else the weights of checkpoint.init_from. True if resumed."""
        t = self.cfg.train
        self.step, self.schedule_steps = 0, t.lr_schedule_steps or t.max_steps
        self.train_samples = max(t.max_steps, self.schedule_steps) * t.global_batch_size
        self.skipped_steps = self.consecutive_skips = 0
        latest = ckpt.find_latest(self.run_dir)
        if latest is not None:
            self._check_config_change(ckpt.read_meta(latest), latest)
            self.load_state_dict(ckpt.load(latest, self.model, self.optimizer, model_shape=self._model_shape()))
            self.log(f"resumed from {latest} at step {self.step}")
            return True
        if self.cfg.checkpoint.init_from:
            src = ckpt.resolve(self.cfg.checkpoint.init_from)
            ckpt.load(src, self.model, None, model_shape=self._model_shape())
            self.log(f"initialised weights from {src}")
        return False

    def state_dict(self) -> dict:
        """The run's progress and what describes it, as JSON: the meta dict of ``checkpoint.save``
        (its commit marker ``nld_checkpoint.json``, docs/checkpointing.md). Weights, AdamW state and
        the per-rank RNG states are saved by ``checkpoint.save`` itself (sharded tensors, rng/)."""
        return {"lr_schedule_steps": self.schedule_steps, "train_samples": self.train_samples,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "config": asdict(self.cfg),
                "consumed_samples": self.step * self.cfg.train.global_batch_size,
                "model_shape": self._model_shape(),
                "objective": self.cfg.objective.name,
                "tensor_model_parallel_size": self.layout.tp, "recipe": self.cfg.recipe,
                "step": self.step}

    def load_state_dict(self, meta: dict) -> None:
        """Resume the progress of ``meta`` (a checkpoint's meta dict, ``state_dict()`` of the run that saved it)."""
        t = self.cfg.train
        self.step, self.skipped_steps = meta["step"], meta.get("skipped_steps", 0)
        self.consecutive_skips = meta.get("consecutive_skips", 0)
        self.schedule_steps = t.lr_schedule_steps or meta["lr_schedule_steps"]
        # megatron's sample order depends on how many samples the dataset is built for: keep the
        # count of the first start unless the run now needs more (then the order is rebuilt)
        needed = max(t.max_steps, self.schedule_steps) * t.global_batch_size
        if needed > meta["train_samples"]:
            self.log(f"warning: the run now needs {needed} samples, more than the {meta['train_samples']} "
                      "its data order was built for; megatron rebuilds the sample order")
        self.train_samples = max(needed, meta["train_samples"])

    def _model_shape(self) -> dict:
        # the padded vocabulary must match too: it grows in multiples of 128 x TP
        return model_shape(self.cfg.model, self.layout.tp)

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
        """Collective: save the current step now (``CheckpointManager.save``)."""
        self.checkpointer.save(self.step, sync=sync)

    def fit(self) -> None:
        """Train from ``self.step`` to ``train.max_steps``. Each step: update, metrics, evaluations
        at their intervals, one log line; then the checkpoint manager saves when its cadence says so
        (and raises ``Preempted`` after a preemption signal)."""
        t = self.cfg.train
        self.ddp.train()
        self.log(self._describe())
        start_step, t_start = self.step, time.time()
        while self.step < t.max_steps:
            t0 = time.time()
            row = self.train_step(self.step)
            self.step += 1
            row = {"step": self.step, **row, **self._throughput(time.time() - t0)}
            if t.eval_interval and self.step % t.eval_interval == 0:
                row.update(self.evaluate())
            if self.cfg.eval.interval and self.step % self.cfg.eval.interval == 0:
                # benchmarks (docs/evaluation.md): rank 0 evaluates; the others wait outside any
                # collective, so no process-group timeout bounds the eval's length
                row.update(on_rank0(lambda: self.eval_hook(self)) or {})
            self._report(row, start_step, t_start)
            self.checkpointer.maybe_save(self.step, last=self.step == t.max_steps)

    def _describe(self) -> str:
        lay, t = self.layout, self.cfg.train
        return (f"training {self.cfg.recipe or 'run'}: objective={self.cfg.objective.name} steps "
                f"{self.step}->{t.max_steps} world={lay.world_size} (tp={lay.tp}, "
                f"dp={lay.dp}{', optimizer state sharded over dp' if self.cfg.parallel.distributed_optimizer else ''}) "
                f"device={self.caps.device} te={self.caps.transformer_engine} "
                f"apex={self.caps.apex} precision={self.precision} "
                f"deterministic={'on (' + ', '.join(self.determinism) + ')' if self.determinism else 'off'} "
                f"mfu={'vs %.0f TFLOP/s/GPU (%s)' % (self.peak_flops / 1e12, self.peak_source) if self.peak_flops else 'off: ' + self.peak_source} "
                f"run_dir={self.run_dir}")

    def _throughput(self, dt: float) -> dict:
        """Tokens so far and this step's speed (and MFU on GPUs with a known bf16 peak)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * t.seq_length
        out = {"tokens": self.step * tokens_per_step, "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / (self.peak_flops * self.layout.world_size)
        return out

    def _report(self, row: dict, start_step: int, t_start: float) -> None:
        """Rank 0: the row to metrics.jsonl and W&B; a progress line every train.log_interval steps and at the end."""
        t = self.cfg.train
        if not self.rank0:
            return
        self.metrics.write(row)
        self.wandb.log(row)
        if self.step % t.log_interval == 0 or self.step == t.max_steps:
            eta = (time.time() - t_start) / (self.step - start_step) * (t.max_steps - self.step)
            print(progress_line(row, t.max_steps, eta), flush=True)

    def close(self) -> None:
        self.checkpointer.close()
        if self.rank0:
            self.metrics.close()
            self.wandb.finish()

