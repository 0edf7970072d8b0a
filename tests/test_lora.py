"""LoRA drafter: off in verify passes (verify logits unchanged, greedy spec == AR), on in draft passes,
the training forward equals the inference draft pass, save/load in PEFT layout, training lowers the loss."""
import json

import pytest
import torch

from nld_train.inference import NLDConfig, NLDForDecoding
from nld_train.lora import LoRAAdapter, load_adapter

MASK = 1
pytestmark = pytest.mark.usefixtures("one_thread")


def lm(seed=0, vocab=48):
    cfg = NLDConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK, eos_token_id=0)
    return NLDForDecoding.random(cfg, seed=seed, std=0.3, dtype=torch.float64).eval()


def adapter(model, seed=1, scale=0.5):
    ad = LoRAAdapter.for_model(model, rank=4, alpha=8, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in ad.B:      # a non-zero update (a fresh adapter is a no-op by construction)
            b.copy_(scale * torch.randn(b.shape, generator=g, dtype=torch.float64))
    return ad.requires_grad_(False)


def test_lora_only_in_draft_passes():
    model, ad = lm(), None
    ad = adapter(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = model.new_cache(1, 32)
    plain_causal = model.causal_pass(ids, cache, update=False)
    plain_block = model.block_pass(torch.tensor([[9, MASK, MASK, MASK]]), cache)
    with ad.attached(model):
        model._use_lora(ad)
        try:
            lora_causal = model.causal_pass(ids, cache, update=False)   # verify / prefill: gate off
            lora_block = model.block_pass(torch.tensor([[9, MASK, MASK, MASK]]), cache)  # draft: gate on
        finally:
            model._use_lora(None)
    assert torch.equal(plain_causal, lora_causal)
    assert (plain_block - lora_block).abs().max() > 1e-3
    # detached again: no hook left behind
    assert torch.equal(model.block_pass(torch.tensor([[9, MASK, MASK, MASK]]), cache), plain_block)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_spec_with_lora_equals_ar(seed):
    from tests.test_inference_invariants import left_padded, rows
    model = lm(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 48, (n,), generator=g).tolist() for n in (1, 5, 3)]
    ids, mask = left_padded(prompts)
    P = ids.shape[1]
    ref = rows(model.ar_generate(ids, 17, attention_mask=mask, eos_token_id=-1)[0], prompts, P, -1)
    ad = adapter(model, seed=seed + 5)
    for name in ("linear_spec_generate", "quadratic_spec_generate"):
        fn = getattr(model, name)
        base_out, _ = fn(ids, 17, block_length=4, attention_mask=mask, eos_token_id=-1)
        base_acc = model.last_stats.accepted
        out, _ = fn(ids, 17, block_length=4, attention_mask=mask, eos_token_id=-1, lora=ad)
        assert rows(out, prompts, P, -1) == ref, name
        assert model.last_stats.accepted != base_acc, name    # the drafts changed: LoRA was on
        assert ad.gate is None and model._lora is None


def test_training_forward_equals_the_inference_draft_pass():
    from nld_train.addons.lora import draft_mask
    model = lm()
    ad = adapter(model)
    seq = torch.randint(2, 48, (1, 12), generator=torch.Generator().manual_seed(0))
    starts, B = torch.tensor([[5, 8]]), 4
    cache = model.new_cache(1, 40)
    model.causal_pass(seq, cache)
    drafts = torch.full((1, 2, B), MASK)
    drafts[:, :, 0] = seq[0, starts[0]]
    pos = (starts[..., None] + torch.arange(B)).view(1, -1)
    with ad.attached(model):
        ad.gate = True
        train_logits = model(drafts.view(1, -1), pos, draft_mask(starts, 12, B), cache).view(1, 2, B, -1)
        model._use_lora(ad)
        try:
            for k, s in enumerate(starts[0].tolist()):
                c = model.new_cache(1, 40)
                model.causal_pass(seq[:, :s], c)
                inf_logits = model.block_pass(drafts[:, k], c)
                assert torch.allclose(train_logits[:, k], inf_logits, atol=1e-10)
        finally:
            model._use_lora(None)


def test_save_load_peft_layout(tmp_path):
    model = lm()
    ad = adapter(model)
    ad.base_model = "runs/demo/stage2"
    ad.save(tmp_path / "run" / "linear_spec_lora")
    d = tmp_path / "run" / "linear_spec_lora"
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["o_proj"]
    from safetensors.torch import load_file
    keys = sorted(load_file(str(d / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" and len(keys) == 4
    back = load_adapter(tmp_path / "run")           # the run dir works too
    assert back.scale == ad.scale and back.base_model == "runs/demo/stage2"
    for a, b in zip(list(ad.parameters()), list(back.parameters()), strict=True):
        assert torch.equal(a.float(), b)
    ids = torch.tensor([[3, 4, 5]])
    o1, _ = model.linear_spec_generate(ids, 8, block_length=4, eos_token_id=-1, lora=ad)
    st1 = model.last_stats.accepted
    o2, _ = model.linear_spec_generate(ids, 8, block_length=4, eos_token_id=-1, lora=tmp_path / "run")
    assert torch.equal(o1, o2) and model.last_stats.accepted == st1
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="o_proj"):
        load_adapter(d)
    with pytest.raises(ValueError, match="does not fit"):
        LoRAAdapter(3, 32, 32, rank=2, alpha=4).check(model)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_training_lowers_the_draft_loss(loss):
    from nld_train.addons.lora import draft_loss
    model = lm().float()
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(2, 48, (4, 16), generator=g)
    starts = torch.randint(4, 12, (4, 2), generator=g)
    ad = LoRAAdapter.for_model(model, rank=8, alpha=32)
    opt = torch.optim.Adam(ad.parameters(), lr=1e-2)
    losses = []
    with ad.attached(model):
        for _ in range(40):
            total, extra, n = draft_loss(model, ad, seqs, starts, 4, loss)
            opt.zero_grad()
            (total / n).backward()
            opt.step()
            losses.append(float(total.detach()) / n)
    assert all(p.grad is not None for p in ad.A)  # gradients reach every layer
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert 0 <= extra["acc"] <= n
