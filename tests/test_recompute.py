"""Activation recomputation (parallel.recompute) and the distributed optimizer on one process.

Recomputation re-runs the same kernels on the same inputs in backward, so the loss sums and every
gradient equal the run without it bit for bit (fp32, CPU), for the AR and the joint (structured
mask) layouts. The recomputation really happens: the recomputed modules run twice per step.
"""
import pytest
import torch

from nld_train.config import ConfigError
from tests.test_trainer import grads, make_trainer

tr_layers = 2  # model=micro (recipe=smoke)

MODES = {"full": ["parallel.recompute=full"],
         "selective": ["parallel.recompute=selective", "parallel.recompute_modules=[core_attn,mlp]"]}


def counted_grads(tr, monkeypatch):
    """Gradients of batch 0, and how often core attention and the MLP ran."""
    import nld_train.model.attention as attention
    calls = {"attend": 0, "mlp": 0}
    real = attention.attend

    def attend(*a, **k):
        calls["attend"] += 1
        return real(*a, **k)
    monkeypatch.setattr(attention, "attend", attend)
    for layer in tr.model.decoder.layers:  # fc1: the first op of the MLP, rerun by either mode
        layer.mlp.linear_fc1.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    return grads(tr), calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist1):
    out = {}
    for obj in ("ar", "joint"):
        with pytest.MonkeyPatch.context() as mp:
            out[obj] = counted_grads(make_trainer(tmp_path_factory.mktemp(obj), f"objective={obj}"), mp)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("obj", ["ar", "joint"])
def test_recompute_is_bit_exact(reference, tmp_path, monkeypatch, obj, mode):
    (g, s, c), calls = counted_grads(make_trainer(tmp_path, f"objective={obj}", *MODES[mode]), monkeypatch)
    (ref_g, ref_s, ref_c), ref_calls = reference[obj]
    forwards = tr_layers * 2  # 2 micro-batches of 2 (global batch 4)
    assert ref_calls == {"attend": forwards, "mlp": forwards}
    assert calls == {"attend": 2 * forwards, "mlp": 2 * forwards}  # forward, then again in backward
    assert torch.equal(c, ref_c) and torch.equal(s, ref_s)
    for k in ref_g:
        assert torch.equal(g[k], ref_g[k]), k


def test_recompute_keys_are_validated():
    from nld_train.cli import load_config
    with pytest.raises(ConfigError, match="parallel.recompute"):
        load_config(["recipe=smoke", "parallel.recompute=partial"])
    with pytest.raises(ConfigError, match="parallel.recompute_modules"):
        load_config(["recipe=smoke", "parallel.recompute=selective", "parallel.recompute_modules=[moe]"])


def test_distributed_optimizer_trains_on_one_process(dist1, tmp_path):
    """At DP=1 the sharded optimizer owns everything and gives the plain optimizer's gradients and
    losses bit for bit (the DP=2 and TP=2 x DP=2 cases are in test_multiprocess.py)."""
    from nld_train.dist import is_sharded
    runs = {}
    for name, ov in (("plain", []), ("zero", ["parallel.distributed_optimizer=true"])):
        tr = make_trainer(tmp_path, *ov, name=name)
        runs[name] = ([tr.train_step(s)["loss"] for s in range(2)], tr)
    assert is_sharded(runs["zero"][1].optimizer) and not is_sharded(runs["plain"][1].optimizer)
    assert runs["zero"][0] == runs["plain"][0]
    for a, b in zip(runs["zero"][1].params, runs["plain"][1].params, strict=True):
        assert torch.equal(a, b)


def test_unshardable_optimizer_state_fails_at_start(dist1, tmp_path, monkeypatch):
    """The sharded optimizer's checkpoint layout is checked when the trainer starts, not at its first
    save: a parameter whose replica id does not name the data-parallel rank is refused."""
    from dataclasses import replace

    from nld_train import checkpoint as ckpt
    from nld_train.errors import CheckpointError
    tr = make_trainer(tmp_path, "parallel.distributed_optimizer=true")
    real = tr.model.sharded_state_dict
    monkeypatch.setattr(tr.model, "sharded_state_dict", lambda *a, **k: {
        n: replace(v, replica_id=0) if n.endswith(".weight") else v for n, v in real(*a, **k).items()})
    with pytest.raises(CheckpointError, match="replica_id"):
        ckpt.check_shardable_optimizer_state(tr.model, tr.optimizer)


def _plan_cfg(*overrides):
    from nld_train.cli import load_config
    return load_config(["recipe=stage2", "model=nld_3b", "parallel=single", "train.dry_run=true", "nodes=32",
                        *overrides])


def test_planner_accounts_for_recompute_and_distributed_optimizer():
    from nld_train.config import padded_vocab_size
    from nld_train.plan import memory_per_gpu, parameter_count
    base = memory_per_gpu(_plan_cfg())
    dopt = memory_per_gpu(_plan_cfg("parallel.distributed_optimizer=true"))
    m = _plan_cfg().model
    params = parameter_count(m, 1)["per_gpu"]
    assert base.optimizer == pytest.approx(8 * params)
    # whole parameters per rank over DP 256: the rank holding the embedding (3.2 GB of moments) is
    # the most loaded, far above an even 1/256 split
    assert dopt.optimizer == 8 * padded_vocab_size(m, 1) * m.hidden_size > 8 * params / 256
    assert dopt.weights == base.weights and dopt.grads == base.grads and dopt.activations == base.activations
    m, tokens = _plan_cfg().model, 2 * 4096
    full = memory_per_gpu(_plan_cfg("parallel.recompute=full"))
    sel = memory_per_gpu(_plan_cfg("parallel.recompute=selective", "parallel.recompute_modules=[mlp]"))
    attn = memory_per_gpu(_plan_cfg("parallel.recompute=selective"))  # core_attn: nothing kept with flash/flex
    assert attn.activations == base.activations
    assert base.activations - sel.activations == pytest.approx(tokens * (m.num_layers - 1) * 6 * m.ffn_hidden_size)
    per_layer = (base.activations / tokens - 4 * m.hidden_size) / m.num_layers
    assert full.activations == pytest.approx(tokens * (m.num_layers * 4 * m.hidden_size + per_layer + 4 * m.hidden_size))
    assert full.activations < sel.activations < base.activations


def test_refusal_suggests_the_distributed_optimizer(capsys):
    from nld_train.cli import main
    # 3B stage 2 at TP 1 needs ~96 GB per GPU; sharding Adam over DP 256 brings it to ~66 GB
    assert main(["recipe=stage2", "model=nld_3b", "parallel=single", "train.dry_run=true", "nodes=32"]) == 2
    out = capsys.readouterr().out
    assert "refused:" in out and "parallel.distributed_optimizer=true fits" in out and "parallel=tp" not in out.split("refused:")[1]
    assert main(["recipe=stage2", "model=nld_3b", "parallel=single", "parallel.distributed_optimizer=true",
                 "train.dry_run=true", "nodes=32"]) == 0
    assert "sharded over DP 256" in capsys.readouterr().out


def test_refusal_keeps_what_the_config_already_sets(capsys):
    """A suggestion adds to the configured memory options, never drops them: with full recompute
    already set, sharding the optimizer is enough (and the plan it quotes keeps full recompute)."""
    from nld_train.cli import main
    args = ["recipe=stage2", "model=nld_3b", "parallel=single", "parallel.recompute=full", "train.dry_run=true",
            "nodes=32"]
    assert main(args) == 2
    hint = capsys.readouterr().out.split("refused:")[1]
    assert "parallel.distributed_optimizer=true fits" in hint and "parallel.recompute" not in hint
    quoted = float(hint.split("fits (")[1].split(" GB")[0])
    assert main(args + ["parallel.distributed_optimizer=true"]) == 0
    assert f"= {quoted:.1f} GB of 72 GB usable" in capsys.readouterr().out
