"""Checkpoints move between models with and without Transformer Engine (issue 17, item 5).

TE modules add ``_extra_state`` entries (FP8 scaling metadata) that megatron saves as
ShardedObjects. megatron's local linears carry the same keys (value None), but TE's final norm
(``te.pytorch.RMSNorm``, a TE op) has one that the local spec's norm lacks. Without TE on this
machine, a "TE-like" model stands in: the same megatron model whose final norm and linears carry
extra state exactly as TE's do (a uint8 tensor of pickled FP8 metadata; None or an empty tensor
loads as a no-op). Both directions must load, through the trainer's load and load_model /
nld-convert to-hf, and any other absent or surplus tensor must still be refused.
"""
import pickle

import pytest
import torch

from nld_train.model.gpt import RMSNormSP

pytestmark = pytest.mark.usefixtures("one_thread")


def _payload(obj) -> torch.Tensor:
    """TE's serialisation of extra state: pickle -> uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


class TELikeNorm(RMSNormSP):
    """A norm with extra state as te.pytorch.RMSNorm (TE ops) has: always a pickled dict."""
    def get_extra_state(self):
        return _payload(getattr(self, "fp8_meta", {}))

    def set_extra_state(self, state):
        if state is None or state.numel() == 0:   # TE: nothing saved -> keep the fresh state
            return
        self.fp8_meta = pickle.loads(state.numpy().tobytes())


def make_te_like(model, amax: float):
    """Give ``model`` TE's extra state: FP8 metadata on the final norm and every linear."""
    norm = model.decoder.final_layernorm
    norm.__class__ = TELikeNorm
    norm.fp8_meta = {"forward": {"amax_history": [amax]}}
    for layer in model.decoder.layers:
        for lin in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
                    layer.mlp.linear_fc2):
            lin.fp8_meta = {"scale_fwd": [amax]}
            lin.get_extra_state = (lambda lin=lin: _payload(lin.fp8_meta))
            lin.set_extra_state = (lambda state, lin=lin: setattr(lin, "loaded_extra", state))
    return model


def _model_cfg():
    from nld_train.config import ModelConfig
    return ModelConfig(name="micro", num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                       ffn_hidden_size=64, kv_channels=16, vocab_size=100, max_position_embeddings=64)


def _build(seed):
    from nld_train.config import ParallelConfig
    from nld_train.model.gpt import build_model
    with torch.random.fork_rng(devices=[]):
        return build_model(_model_cfg(), ParallelConfig(), 64, seed=seed)


def _save(run_dir, model, with_optimizer=True):
    """A checkpoint as the trainer writes it (model + AdamW state + RNG), or weights only (from-hf)."""
    import dataclasses

    from nld_train import checkpoint as ckpt
    from nld_train.config import Config
    from nld_train.convert.importer import save_weights_only
    meta = {"config": dataclasses.asdict(Config(model=_model_cfg())), "tensor_model_parallel_size": 1}
    if not with_optimizer:
        return save_weights_only(run_dir, model, {**meta, "weights_only": True})
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save(run_dir, 1, model, opt, meta, keep_last=1)
    return ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(1)


def _same_weights(a, b):
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith("_extra_state")}
    sb = {k: v for k, v in b.state_dict().items() if not k.endswith("_extra_state")}
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_checkpoint_without_te_loads_into_te_model(tmp_path, dist1, capsys, with_optimizer):
    from nld_train import checkpoint as ckpt
    src = _build(seed=1)
    step = _save(tmp_path / "run", src, with_optimizer)
    dst = make_te_like(_build(seed=2), amax=7.0)
    assert not _same_weights(src, dst)
    opt = torch.optim.AdamW(dst.parameters()) if with_optimizer else None
    ckpt.load(step, dst, opt, restore_rng=False)
    assert _same_weights(src, dst)
    # the norm's FP8 state was not in the checkpoint: it starts as it was; the linears got
    # megatron's None (TE treats it as "nothing saved")
    assert dst.decoder.final_layernorm.fp8_meta == {"forward": {"amax_history": [7.0]}}
    assert dst.decoder.layers[0].self_attention.linear_qkv.loaded_extra is None
    out = capsys.readouterr().out
    assert "absent from the checkpoint for 1 module(s), starting fresh (decoder.final_layernorm._extra_state)" in out


def test_te_checkpoint_loads_into_model_without_te(tmp_path, dist1, capsys):
    from nld_train import checkpoint as ckpt
    src = make_te_like(_build(seed=1), amax=3.0)
    step = _save(tmp_path / "run", src)
    # the TE-like model itself resumes its FP8 state
    again = make_te_like(_build(seed=2), amax=0.0)
    ckpt.load(step, again, torch.optim.AdamW(again.parameters()), restore_rng=False)
    assert again.decoder.final_layernorm.fp8_meta == {"forward": {"amax_history": [3.0]}}
    assert pickle.loads(again.decoder.layers[1].mlp.linear_fc2.loaded_extra.numpy().tobytes()) == {"scale_fwd": [3.0]}
    capsys.readouterr()
    plain = _build(seed=2)
    ckpt.load(step, plain, torch.optim.AdamW(plain.parameters()), restore_rng=False)
    assert _same_weights(src, plain)
    assert "saved for 1 module(s) this model does not have, not used (decoder.final_layernorm._extra_state)" \
        in capsys.readouterr().out


def test_te_checkpoint_to_decoder_and_hf_export(tmp_path, dist1):
    """A cluster (TE) checkpoint on a laptop: load_model (nld-generate, nld-eval) and nld-convert to-hf."""
    from safetensors.torch import load_file

    from nld_train.convert.export import to_hf
    from nld_train.inference import load_model
    src = make_te_like(_build(seed=1), amax=3.0)
    step = _save(tmp_path / "run", src)
    dec = load_model(step)
    assert torch.equal(dec.lm_head.weight, src.output_layer.weight[:100])
    assert torch.equal(dec.model.norm.weight, src.decoder.final_layernorm.weight)
    out = to_hf(step, tmp_path / "hf")
    w = {}
    for f in out.glob("*.safetensors"):
        w.update(load_file(str(f)))
    assert torch.equal(w["model.norm.weight"], src.decoder.final_layernorm.weight)


def test_other_absent_or_surplus_tensors_are_still_refused(tmp_path, dist1):
    from nld_train import checkpoint as ckpt
    from nld_train.errors import CheckpointError
    src = _build(seed=1)
    step = _save(tmp_path / "run", src)
    # the model has a tensor the checkpoint lacks (not extra state): refused, named
    more = _build(seed=2)
    more.decoder.final_layernorm.register_parameter("bias", torch.nn.Parameter(torch.zeros(32)))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) this load needs: \['decoder.final_layernorm.bias'\]"):
        ckpt.load(step, more, None, restore_rng=False)
    # the checkpoint holds a tensor the model has no place for: refused, named
    big = _build(seed=1)
    big.decoder.final_layernorm.register_parameter("bias", torch.nn.Parameter(torch.zeros(32)))
    step2 = _save(tmp_path / "run2", big, with_optimizer=False)
    with pytest.raises(CheckpointError, match=r"no place for: \['decoder.final_layernorm.bias'\]"):
        ckpt.load(step2, _build(seed=2), None, restore_rng=False)


def test_weights_only_checkpoint_cannot_resume_an_optimizer(tmp_path, dist1):
    """A from-hf style checkpoint has no optimizer state: a full resume from it is refused, naming it."""
    from nld_train import checkpoint as ckpt
    from nld_train.errors import CheckpointError
    step = _save(tmp_path / "run", _build(seed=1), with_optimizer=False)
    model = _build(seed=2)
    with pytest.raises(CheckpointError, match=r"this load needs: \['optimizer\.state\.exp_avg"):
        ckpt.load(step, model, torch.optim.AdamW(model.parameters()), restore_rng=False)
