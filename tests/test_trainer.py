"""In-process trainer checks (1-process gloo group): exact global averaging, checkpoints, shapes."""
import pytest
import torch

from nld_train.cli import load_config

SMALL = ["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled"]


def make_trainer(tmp_path, *overrides, name="run", eval_hook=None):
    from nld_train.train.trainer import Trainer
    cfg = load_config([*SMALL, f"run.dir={tmp_path / name}", *overrides], world_size=1)
    return Trainer(cfg, eval_hook=eval_hook)


def grads(trainer, step=0):
    sums, counts = trainer.forward_backward(step)
    g = {n: p.main_grad.detach().clone() for n, p in trainer.ddp.module.named_parameters()}
    return g, sums, counts


def max_rel_diff(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.mark.parametrize("norm", ["combined", "separate"])
def test_gradient_independent_of_microbatch_split(dist1, tmp_path, norm):
    """1 micro-batch of 4 vs 4 micro-batches of 1: the same global-batch gradient (fp32 round-off)."""
    g4, s4, c4 = grads(make_trainer(tmp_path, "train.micro_batch_size=4",
                                    f"objective.loss_normalization={norm}", name="a"))
    g1, s1, c1 = grads(make_trainer(tmp_path, "train.micro_batch_size=1",
                                    f"objective.loss_normalization={norm}", name="b"))
    assert torch.equal(c4, c1) and c4[1] > 0  # identical noise: it depends on the sample, not the split
    assert torch.allclose(s4, s1, rtol=1e-5)
    assert max_rel_diff(g1, g4) < 1e-4


def test_per_microbatch_normalisation_differs(dist1, tmp_path):
    """The public recipe's per-micro-batch mean is not the global token mean (the ablation switch)."""
    g4, _, _ = grads(make_trainer(tmp_path, "train.micro_batch_size=4", name="a"))
    g1, _, _ = grads(make_trainer(tmp_path, "train.micro_batch_size=1",
                                  "objective.loss_normalization=per_microbatch", name="b"))
    assert max_rel_diff(g1, g4) > 1e-3


def test_gradient_matches_full_batch_autograd(dist1, tmp_path):
    """The trainer's gradient equals plain autograd of the combined objective over the whole batch."""
    tr = make_trainer(tmp_path, "train.micro_batch_size=2")
    g, _, _ = grads(tr)
    ref = make_trainer(tmp_path, "train.micro_batch_size=4", name="ref")
    preps, counts = ref._prepare(ref.train_ds, 0)
    (prep,) = preps
    model = ref.model
    attn = model.attention_inputs("joint", ref.cfg.train.seq_length, ref.cfg.objective.block_size, "cpu")
    logits = model.full_logits(prep.input_ids, prep.position_ids, attn)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), prep.targets.flatten(), reduction="none")
    ce = ce.view(prep.targets.shape)
    L = ref.cfg.train.seq_length
    s_diff = (ce[:, :L] * prep.masked / prep.p[:, None]).sum()
    s_ar = (ce[:, L:] * prep.loss_mask).sum()
    loss = (0.3 * s_diff + s_ar) / (prep.masked.sum() + prep.loss_mask.sum())
    ref.ddp.zero_grad_buffer()
    loss.backward()  # DDP's hooks accumulate into main_grad (1 process: nothing to reduce)
    ref_g = {n: p.main_grad for n, p in model.named_parameters()}
    assert max_rel_diff(g, ref_g) < 1e-4


def test_losses_equal_for_microbatch_sizes_over_steps(dist1, tmp_path):
    a = make_trainer(tmp_path, "train.micro_batch_size=1", name="a")
    b = make_trainer(tmp_path, "train.micro_batch_size=4", name="b")
    for step in range(3):
        ra, rb = a.train_step(step), b.train_step(step)
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * rb["grad_norm"]


def test_overlapped_grad_reduce_in_buckets_changes_nothing(dist1, tmp_path):
    """parallel.overlap_grad_reduce with 8 buckets and 4 micro-batches (no_sync on all but the last):
    the same gradients and losses bit for bit (DP=2 and TP2 x DP2: tests/test_multiprocess.py)."""
    a = make_trainer(tmp_path, "train.micro_batch_size=1", name="a")
    b = make_trainer(tmp_path, "train.micro_batch_size=1", "parallel.overlap_grad_reduce=true",
                     "parallel.ddp_bucket_size=5000", name="b")
    assert len(b.ddp.bucket_groups) > 4 and len(a.ddp.bucket_groups) == 1
    # when each bucket's all-reduce starts: during the backward, or in finalize_model_grads' wait
    starts, phase = [], {"finishing": False}

    def spy(obj, name, before):
        orig = getattr(obj, name)

        def wrapped(*args, **kwargs):
            before()
            return orig(*args, **kwargs)
        setattr(obj, name, wrapped)
    for g in b.ddp.bucket_groups:
        spy(g, "start_grad_sync", lambda: starts.append(phase["finishing"]))
    spy(b.ddp, "finish_grad_sync", lambda: phase.update(finishing=True))
    spy(b.ddp, "zero_grad_buffer", lambda: phase.update(finishing=False))  # a new batch
    for step in range(2):
        del starts[:]
        ga, sa, _ = grads(a, step)
        gb, sb, _ = grads(b, step)
        assert torch.equal(sa, sb) and all(torch.equal(ga[k], gb[k]) for k in ga)
        assert a.train_step(step) == b.train_step(step)
    # after the first batch (megatron learns which gradients complete a bucket) every bucket went
    # out during the backward of the last micro-batch, none waited for finalize_model_grads
    assert len(starts) == 2 * len(b.ddp.bucket_groups) and not any(starts)  # grads() + train_step


def test_bucket_size_without_overlap_is_refused(dist1, tmp_path):
    from nld_train.config import ConfigError
    with pytest.raises(ConfigError, match="parallel.ddp_bucket_size"):
        make_trainer(tmp_path, "parallel.ddp_bucket_size=5000")  # overlap is off on CPU unless set
    with pytest.raises(ConfigError, match="parallel.ddp_bucket_size"):
        make_trainer(tmp_path, "parallel.overlap_grad_reduce=false", "parallel.ddp_bucket_size=5000")


def test_checkpoint_of_another_shape_is_refused(dist1, tmp_path):
    from nld_train.checkpoint import CheckpointError
    tr = make_trainer(tmp_path, name="src")
    tr.step = 1
    tr.save()
    from nld_train.config import ConfigError
    from nld_train.train.trainer import Trainer
    # checkpoint.init_from carries the model: a contradicting command line fails while composing
    with pytest.raises(ConfigError, match="model.hidden_size=32 contradicts checkpoint.init_from"):
        make_trainer(tmp_path, f"checkpoint.init_from={tmp_path / 'src'}", "model.hidden_size=32", name="dst")
    # and the load itself still compares the shapes (a config made without the command line)
    cfg = load_config([*SMALL, f"run.dir={tmp_path / 'dst'}", "model.hidden_size=32"], world_size=1)
    cfg.checkpoint.init_from = str(tmp_path / "src")
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 64 vs config 32"):
        Trainer(cfg)


def test_incomplete_checkpoint_is_never_loaded(dist1, tmp_path):
    from nld_train import checkpoint as ckpt
    tr = make_trainer(tmp_path, name="src")
    tr.step = 2
    tr.save()
    good = ckpt.find_latest(tmp_path / "src")
    assert good.name == "step_00000002" and (good.parent / "latest").read_text().strip() == good.name
    # a later save that died before its commit marker: a step folder without nld_checkpoint.json
    broken = good.parent / "step_00000003"
    broken.mkdir()
    (broken / "metadata.json").write_text("{}")
    assert ckpt.find_latest(tmp_path / "src") == good
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve(broken)
    resumed = make_trainer(tmp_path, name="src")
    assert resumed.step == 2


def test_lr_schedule_length_is_stored(dist1, tmp_path):
    tr = make_trainer(tmp_path, "train.max_steps=10", "train.lr_schedule=cosine", name="s")
    tr.step = 10
    tr.save()
    longer = make_trainer(tmp_path, "train.max_steps=20", "train.lr_schedule=cosine", name="s")
    assert longer.step == 10 and longer.schedule_steps == 10  # extending max_steps keeps the past schedule


def test_tokenizer_mask_token_must_match_model(dist1, tmp_path):
    with pytest.raises(ValueError, match="mask"):
        make_trainer(tmp_path, "model.mask_token_id=5")


def test_wandb_offline_run_id_survives_resume(dist1, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tr = make_trainer(tmp_path, "wandb.mode=offline", name="w")
    run_id = (tmp_path / "w" / "wandb_id").read_text()
    assert tr.wandb.run is not None and tr.wandb.run.id == run_id
    tr.step = 1
    tr.save()
    tr.close()
    again = make_trainer(tmp_path, "wandb.mode=offline", name="w")
    assert again.wandb.run.id == run_id and (tmp_path / "w" / "wandb").is_dir()
    again.close()
