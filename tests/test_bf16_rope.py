"""bf16 decoding keeps the RoPE angles in fp32 (issue 17, item 1).

A bf16 cast of the frequency buffer (``load_model(dtype=bf16)``, ``from_pretrained(dtype=bf16)``)
used to form ``position * inv_freq`` in bf16: positions 1000-1003 all became 1000 or 1004 and the
highest frequency was off by ~4 rad at position 2000, so late positions decoded garbage while early
ones looked fine. The check is exactly that signature: the bf16-vs-fp32 logit error of positions
near 2000 must stay within 3x the error of positions < 128.

A random model with the usual small weights attends almost uniformly, so rotating keys wrongly
barely moves its logits; the fixture gives queries and keys large weights (sharp, position-
dependent attention), which makes the bf16-angle defect show as it did on the trained demo model.
"""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

L = 2048
EARLY, LATE = slice(0, 128), slice(L - 128, L)


def _rel_err(got, ref, sl):
    ref = ref[:, sl].float()
    return ((got[:, sl].float() - ref).abs().max() / ref.abs().max()).item()


def assert_late_error_bounded(got, ref):
    early, late = _rel_err(got, ref, EARLY), _rel_err(got, ref, LATE)
    assert late <= 3 * early, f"bf16 vs fp32 logits: {late:.3g} at positions {LATE.start}..{L - 1} against " \
                              f"{early:.3g} at 0..127 (RoPE angles not formed in fp32?)"


def make_llama(out, seed=0):
    """A tiny HF Llama (4096 positions) with sharp attention, saved to ``out``."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                   max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu",
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            std = 0.3 if ("q_proj" in n or "k_proj" in n) else 0.05
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in n else std * torch.randn_like(p))
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, dist1):
    """The HF model, its nld-train checkpoint and its export (remote code)."""
    from nld_train.convert.export import to_hf
    from nld_train.convert.importer import from_hf
    root = tmp_path_factory.mktemp("sharp")
    make_llama(root / "hf")
    step = from_hf(root / "hf", root / "nld", mask_token_id=3)
    to_hf(root / "nld", root / "export")
    ids = torch.randint(4, 320, (1, L), generator=torch.Generator().manual_seed(1))
    return dict(step=step, export=root / "export", ids=ids)


def _plain_logits(model, ids):
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()[None, None]
    with torch.no_grad():
        return model(ids, pos, mask)


def test_load_model_bf16_keeps_rope_angles_fp32(sharp):
    from nld_train.inference import load_model
    ref = _plain_logits(load_model(sharp["step"]), sharp["ids"])
    bf = load_model(sharp["step"], dtype=torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.inv_freq.dtype == torch.float32
    assert_late_error_bounded(_plain_logits(bf, sharp["ids"]), ref)


def test_remote_code_bf16_keeps_rope_angles_fp32(sharp):
    from transformers import AutoModelForCausalLM
    ids = sharp["ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(sharp["export"], trust_remote_code=True)(ids).logits
        bf = AutoModelForCausalLM.from_pretrained(sharp["export"], trust_remote_code=True, dtype=torch.bfloat16)
        assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.decoder().inv_freq.dtype == torch.float32
        got = bf(ids).logits
        # and a model cast after loading (model.to(bfloat16)), the other way users get a bf16 model
        cast = AutoModelForCausalLM.from_pretrained(sharp["export"], trust_remote_code=True).to(torch.bfloat16)
        got_cast = cast(ids).logits
    assert_late_error_bounded(got, ref)
    assert_late_error_bounded(got_cast, ref)


def test_training_model_frequencies_follow_device_stay_fp32(dist1):
    """megatron's inv_freq is a plain attribute that module casts skip: it must follow the
    parameters' device (megatron itself moves it only from the CPU to CUDA, lazily) and stay fp32."""
    from nld_train.config import ModelConfig, ParallelConfig
    from nld_train.model.gpt import build_model
    m = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
                    kv_channels=16, vocab_size=64, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        model = build_model(m, ParallelConfig(), 64, seed=0)
    want = model.rotary_pos_emb.inv_freq.clone()
    assert want.dtype == torch.float32
    model.to(torch.bfloat16)
    assert torch.equal(model.rotary_pos_emb.inv_freq, want)
    model.to("meta")
    inv = model.rotary_pos_emb.inv_freq
    assert inv.is_meta and inv.dtype == torch.float32
