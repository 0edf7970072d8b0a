"""GPU-only checks (issue 17, item 12): run with `pytest -m cuda` on a CUDA machine; every test here
is skipped without CUDA (and in a plain CPU-suite run, which hides the GPUs: tests/conftest.py).
The GPU acceptance script runs them. Small shapes: the whole file takes seconds plus start-up.

- bf16 RoPE on CUDA: load_model(dtype=bf16) keeps fp32 angles, and the training model's
  frequencies follow it to the GPU;
- checkpoints between a Transformer Engine model and one without TE (skipped without TE);
- RNG: a CPU-saved RNG state resumed on CUDA, and a CUDA save/load round trip;
- train.deterministic: two identical bf16 forward/backward passes give identical gradients (first
  in the file: cuBLAS reads its workspace setting when its first handle is made).
"""
import pickle

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]


# -- train.deterministic --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "joint"])
def test_deterministic_mode_gives_identical_bf16_gradients(dist1, device, kind, monkeypatch):
    from nld_train.config import ModelConfig, ParallelConfig
    from nld_train.dist import apply_determinism
    from nld_train.model.gpt import build_model
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = torch.are_deterministic_algorithms_enabled()
    apply_determinism(True)
    try:
        m = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                        kv_channels=32, vocab_size=512, max_position_embeddings=512,
                        attention_backend="sdpa")
        model = build_model(m, ParallelConfig(), 256, seed=0)
        L = 256
        n = 2 * L if kind == "joint" else L
        ids = torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(0)).to(device)
        pos = torch.arange(L, device=device).repeat(n // L)[None].expand(2, -1)
        att = model.attention_inputs(kind, L, 32, device)

        def grads():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.full_logits(ids, pos, att).float().logsumexp(-1).mean()
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in model.parameters()]
        l1, g1 = grads()
        l2, g2 = grads()
        assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    finally:
        torch.use_deterministic_algorithms(flags)


# -- bf16 RoPE ------------------------------------------------------------------------------------
def test_bf16_decoding_on_cuda_keeps_rope_angles_fp32(tmp_path_factory, dist1, device):
    from nld_train.convert.importer import from_hf
    from nld_train.inference import load_model
    from tests.test_bf16_rope import L, assert_late_error_bounded, make_llama
    root = tmp_path_factory.mktemp("cuda_rope")
    make_llama(root / "hf")
    step = from_hf(root / "hf", root / "nld", mask_token_id=3)
    ids = torch.randint(4, 320, (1, L), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.arange(L, device=device)[None]
    mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
    with torch.no_grad():
        ref = load_model(step, device=device)(ids, pos, mask)
        bf = load_model(step, device=device, dtype=torch.bfloat16)
        assert bf.inv_freq.dtype == torch.float32 and bf.inv_freq.device.type == "cuda"
        assert_late_error_bounded(bf(ids, pos, mask), ref)


def test_training_model_rope_on_cuda(dist1, device):
    from nld_train.config import ModelConfig, ParallelConfig
    from nld_train.model.gpt import build_model
    m = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    kv_channels=16, vocab_size=256, max_position_embeddings=256)
    model = build_model(m, ParallelConfig(), 128, seed=0)
    inv = model.rotary_pos_emb.inv_freq
    assert inv.device.type == "cuda" and inv.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 64), device=device)
    pos = torch.arange(64, device=device)[None].expand(2, -1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.full_logits(ids, pos, model.attention_inputs("causal", 64, 16, device))
    assert out.shape == (2, 64, 256) and torch.isfinite(out.float()).all()


# -- Transformer Engine extra state ------------------------------------------------------------------
def _build(use_te: bool, seed: int, monkeypatch):
    import nld_train.model.gpt as gpt
    from nld_train.config import ModelConfig, ParallelConfig
    from nld_train.dist import Capabilities
    monkeypatch.setattr(gpt, "capabilities", lambda: Capabilities(cuda=True, transformer_engine=use_te,
                                                                   apex=False, device="cuda"))
    m = ModelConfig(name="micro", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=128, kv_channels=16, vocab_size=256, max_position_embeddings=128)
    with torch.random.fork_rng():
        return gpt.build_model(m, ParallelConfig(), 128, seed=seed), m


def test_te_and_local_checkpoints_load_each_other(tmp_path, dist1, monkeypatch):
    pytest.importorskip("transformer_engine", reason="skipped: no TE")
    import dataclasses

    from nld_train import checkpoint as ckpt
    from nld_train.config import Config
    te_model, mcfg = _build(True, 1, monkeypatch)
    assert any(k.endswith("_extra_state") for k in te_model.state_dict())
    meta = {"config": dataclasses.asdict(Config(model=mcfg)), "tensor_model_parallel_size": 1}

    def weights(model):   # the local spec's norm names, as megatron's checkpoint keys map them
        out = {}
        for k, v in model.state_dict().items():
            if k.endswith("_extra_state"):
                continue
            k = k.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
            out[k.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")] = v
        return out

    ckpt.save(tmp_path / "te", 1, te_model, torch.optim.AdamW(te_model.parameters()), meta, keep_last=1)
    local, _ = _build(False, 2, monkeypatch)
    ckpt.load(ckpt.find_latest(tmp_path / "te"), local, torch.optim.AdamW(local.parameters()), restore_rng=False)
    want, got = weights(te_model), weights(local)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    ckpt.save(tmp_path / "local", 1, local, torch.optim.AdamW(local.parameters()), meta, keep_last=1)
    te2, _ = _build(True, 3, monkeypatch)
    ckpt.load(ckpt.find_latest(tmp_path / "local"), te2, torch.optim.AdamW(te2.parameters()), restore_rng=False)
    got = weights(te2)
    assert all(torch.equal(want[k], got[k]) for k in want)


# -- RNG ------------------------------------------------------------------------------------------------
def test_cpu_saved_rng_state_resumes_on_cuda(dist1):
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from nld_train.checkpoint import rng_state, set_rng_state
    tracker = get_cuda_rng_tracker()
    before = dict(tracker.get_states())
    cpu_saved = {"torch": torch.Generator().manual_seed(5).get_state(), "numpy": np.random.RandomState(5).get_state(),
                 "python": random.Random(5).getstate(),
                 "tracker": {name: torch.Generator().manual_seed(9).get_state() for name in before}}
    try:
        notes = set_rng_state(pickle.loads(pickle.dumps(cpu_saved)))
        assert any("another device kind" in n for n in notes) and any("no CUDA RNG state" in n for n in notes)
        with tracker.fork():                    # sequence parallelism / TP regions fork this
            torch.rand(4, device="cuda")
        # a CUDA-saved state round-trips exactly
        saved = rng_state()
        a = torch.rand(4, device="cuda")
        with tracker.fork():
            b = torch.rand(4, device="cuda")
        assert set_rng_state(saved) == []
        assert torch.equal(torch.rand(4, device="cuda"), a)
        with tracker.fork():
            assert torch.equal(torch.rand(4, device="cuda"), b)
    finally:
        tracker.set_states(before)
