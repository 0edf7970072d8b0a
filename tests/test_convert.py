"""nld-convert: HF -> nld-train -> HF round trips and logit parity per family, remote code, refusals.

Tiny random transformers models built offline with odd shapes (several query groups,
head_dim != hidden/heads, vocabularies that are not multiples of 64, tied embeddings, q/k/v biases,
YaRN + Llama-4 query scaling with positions past the original context).
"""
import json
import shutil
import sys

import pytest
import torch

from tests.conftest import REPO, child_env, run_group

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu")
FAMILIES = {
    # name: (config class, kwargs, tokenizer?, from-hf mask arguments)
    "llama": ("LlamaConfig", dict(vocab_size=8200, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), True, {}),
    "mistral": ("MistralConfig", dict(vocab_size=999, hidden_size=48, intermediate_size=64, num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
                False, {"mask_token_id": 5}),
    "qwen2": ("Qwen2Config", dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              False, {"mask_token_id": 7}),
    "ministral3": ("Ministral3Config", dict(vocab_size=1003, hidden_size=64, intermediate_size=96,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                            tie_word_embeddings=False, sliding_window=None,
                                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                             "original_max_position_embeddings": 64,
                                                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                                             "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}),
                   False, {"mask_token_id": 100}),
}
SEQ = 96   # past the ministral3 model's original context (64): query scaling is active


def make_hf(family: str, out, seed=0, **over):
    import transformers
    cls_name, kw, with_tok, _ = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **kw, **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms at 1 and zero biases would hide swapped or dropped tensors
        for n, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in n else 0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    if with_tok:
        from nld_train.data.tokenizer import load_tokenizer
        load_tokenizer(REPO / "nld_train" / "assets" / "demo_tokenizer").save_pretrained(out)
    return model.eval()


def megatron_logits(step_dir, ids):
    """Logits of the nld-train (megatron) model loaded from a converted checkpoint."""
    from nld_train import checkpoint as ckpt
    from nld_train.config import ParallelConfig, model_config_from_dict
    from nld_train.model.gpt import build_model
    mcfg = model_config_from_dict(ckpt.run_config(step_dir)["model"])
    mg = build_model(mcfg, ParallelConfig(), mcfg.max_position_embeddings, seed=1).eval()
    ckpt.load(step_dir, mg, None, restore_rng=False)
    L = ids.shape[1]
    with torch.no_grad():
        return mg.full_logits(ids, torch.arange(L)[None].expand(ids.shape[0], -1),
                              mg.attention_inputs("causal", L, 16, "cpu"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, dist1):
    """Per family: the HF model, its folder, its nld-train checkpoint, and the re-export."""
    from nld_train.convert.export import to_hf
    from nld_train.convert.importer import from_hf
    out = {}
    for family, (_, _, _, mask) in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        model = make_hf(family, root / "hf")
        # llama: vocabulary padded for TP=2 (8200 -> 8448 rows), so a TP=2 run can load it
        step = from_hf(root / "hf", root / "nld", tp=2 if family == "llama" else 1, **mask)
        to_hf(root / "nld", root / "back")
        out[family] = dict(model=model, hf=root / "hf", nld=root / "nld", step=step, back=root / "back")
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_logits_match_transformers(converted, family):
    c = converted[family]
    ids = torch.randint(0, c["model"].config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = c["model"](ids).logits
    got = megatron_logits(c["step"], ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact_and_loads_in_plain_transformers(converted, family):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    c = converted[family]
    src = c["model"].state_dict()
    if c["model"].config.tie_word_embeddings:   # untied on import: the head is the embedding's copy
        src = {**src, "lm_head.weight": src["model.embed_tokens.weight"]}
    index = json.loads((c["back"] / "model.safetensors.index.json").read_text())
    back = {}
    for f in sorted(set(index["weight_map"].values())):
        back.update(load_file(str(c["back"] / f)))
    assert set(back) == set(src)
    for k, v in src.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    d = json.loads((c["back"] / "config.json").read_text())
    assert d["model_type"] == family and d["block_size"] == 32 and d["mask_token_id"] == FAMILIES[family][3].get(
        "mask_token_id", 1)
    plain, info = AutoModelForCausalLM.from_pretrained(c["back"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, d["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, c["model"](ids).logits)


def test_remote_code_decodes_like_nld_inference(converted):
    """trust_remote_code gives the four modes, token for token equal to load_model's (ministral3:
    YaRN + query scaling); its forward equals the plain transformers model's logits."""
    from transformers import AutoModelForCausalLM

    from nld_train.inference import load_model
    c = converted["ministral3"]
    remote = AutoModelForCausalLM.from_pretrained(c["back"], trust_remote_code=True)
    assert type(remote).__name__ == "NLDHFForCausalLM"
    ref = load_model(c["step"])
    ids = torch.randint(0, 1003, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (remote(ids).logits - c["model"](ids).logits).abs().max() < 1e-5
    for mode in ("ar_generate", "generate", "linear_spec_generate", "quadratic_spec_generate"):
        got, nfe = getattr(remote, mode)(ids, 32, eos_token_id=-1)
        want, nfe_ref = getattr(ref, mode)(ids, 32, eos_token_id=-1)
        assert torch.equal(got, want) and nfe == nfe_ref, mode
    # load_model reads the export folder too (the contract), with the same weights
    h = load_model(c["back"])
    assert all(torch.equal(a, b) for a, b in zip(h.state_dict().values(), ref.state_dict().values(), strict=True))


def test_tokenizer_and_nld_layout(converted, tmp_path):
    """The llama model came with a tokenizer (mask token kept); --layout nld names the public
    layout and imports back to the same weights."""
    from transformers import AutoTokenizer

    from nld_train.convert.export import to_hf
    from nld_train.inference.hf_format import read_hf_folder
    c = converted["llama"]
    tok = AutoTokenizer.from_pretrained(c["back"])
    assert tok.mask_token_id == 1 and (c["nld"] / "tokenizer" / "tokenizer.json").is_file()
    to_hf(c["nld"], tmp_path / "pub", layout="nld", dtype="bf16")
    d = json.loads((tmp_path / "pub" / "config.json").read_text())
    assert d["model_type"] == "nemotron_labs_diffusion" and d["architectures"] == ["NemotronLabsDiffusionModel"]
    from safetensors.torch import load_file
    names = set(load_file(str(next((tmp_path / "pub").glob("model-*.safetensors")))))
    assert "diffusion_head.weight" in names and "encoder.embed_tokens.weight" in names
    _, sd, _, info = read_hf_folder(tmp_path / "pub")
    assert info["layout"] == "nld"
    for k, v in c["model"].state_dict().items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k


def test_refusals(tmp_path, converted, capsys):
    from nld_train.convert.export import to_hf
    from nld_train.convert.importer import from_hf
    from nld_train.errors import ConfigError, InputError
    make_hf("mistral", tmp_path / "sw", sliding_window=16)
    with pytest.raises(ConfigError, match="sliding_window"):
        from_hf(tmp_path / "sw", tmp_path / "o1", mask_token_id=5)
    with pytest.raises(InputError, match="no mask token"):
        from_hf(converted["qwen2"]["hf"], tmp_path / "o2")
    with pytest.raises(InputError, match="not empty"):
        to_hf(converted["qwen2"]["nld"], converted["llama"]["back"])
    with pytest.raises(InputError, match="only the qwen2 family"):
        to_hf(converted["qwen2"]["nld"], tmp_path / "o3", family="llama")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    # the CLI prints one line and exits 2
    cfg = json.loads((converted["llama"]["hf"] / "config.json").read_text())
    shutil.copytree(converted["llama"]["hf"], tmp_path / "l3")
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "l3" / "config.json").write_text(json.dumps(cfg))
    from nld_train.convert.cli import main
    assert main(["from-hf", str(tmp_path / "l3"), str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert "rope_type" in err and "llama3" in err, err
    # weights the config has no place for (or lacks): one line naming them, nothing written
    from safetensors.torch import load_file, save_file
    for name, edit_weights in (("extra", lambda w: w.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(4)})),
                               ("lacking", lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))):
        shutil.copytree(converted["llama"]["hf"], tmp_path / name)
        f = next((tmp_path / name).glob("model*.safetensors"))
        w = load_file(str(f))
        edit_weights(w)
        save_file(w, str(f), metadata={"format": "pt"})
        assert main(["from-hf", str(tmp_path / name), str(tmp_path / f"out_{name}")]) == 2
        err = capsys.readouterr().err
        assert ("o_proj.bias" in err and "no place for" in err) if name == "extra" else "up_proj.weight" in err, err
        assert not (tmp_path / f"out_{name}").exists()


TP2_WORKER = """
import sys, torch
from nld_train import checkpoint as ckpt
from nld_train.convert.importer import save_weights_only
from nld_train.config import ParallelConfig
from nld_train.dist import init_distributed
from nld_train.config import model_config_from_dict
from nld_train.model.gpt import build_model
if __name__ == "__main__":   # megatron's save starts a multiprocessing manager (spawn re-imports us)
    src, dst = sys.argv[1], sys.argv[2]
    init_distributed(2)
    meta = ckpt.read_meta(src)
    m = model_config_from_dict(ckpt.run_config(src, meta)["model"])
    model = build_model(m, ParallelConfig(tensor_model_parallel_size=2), m.max_position_embeddings, seed=5)
    ckpt.load(src, model, None, restore_rng=False)
    save_weights_only(__import__("pathlib").Path(dst), model, {**meta, "tensor_model_parallel_size": 2})
"""


@pytest.mark.slow
def test_export_of_a_tp2_checkpoint_equals_tp1(converted, tmp_path):
    """A checkpoint saved by a real 2-process TP=2 model (sharded QKV / gate-up / vocabulary)
    exports to the same bytes as the TP=1 one."""
    from safetensors.torch import load_file

    from nld_train.convert.export import to_hf
    c = converted["llama"]
    (tmp_path / "worker.py").write_text(TP2_WORKER)
    res = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                     str(tmp_path / "worker.py"), str(c["step"]), str(tmp_path / "tp2")], 300, cwd=REPO,
                    env=child_env({"PYTHONPATH": str(REPO)}))
    assert res.returncode == 0, res.stderr[-4000:]
    to_hf(tmp_path / "tp2", tmp_path / "out")
    a = load_file(str(next((tmp_path / "out").glob("model-*.safetensors"))))
    b = load_file(str(next(c["back"].glob("model-*.safetensors"))))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_family_quirks_come_from_the_family_table():
    """The HFFamily records drive every family difference: Llama's attention_bias (also on o_proj)
    is refused, Qwen2 has q/k/v biases and ignores sliding_window unless use_sliding_window, the
    export family follows biases and query scaling, and each family's export fields are written."""
    from nld_train.inference.hf_format import (
        FAMILIES,
        UnsupportedModelError,
        auto_family,
        hf_config_dict,
        nld_config_from_hf,
    )
    d = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, mask_token_id=3)
    with pytest.raises(UnsupportedModelError, match="Llama's attention_bias"):
        nld_config_from_hf({**d, "model_type": "llama", "attention_bias": True})
    assert nld_config_from_hf({**d, "model_type": "mistral", "attention_bias": True}).attention_bias is False
    qwen = nld_config_from_hf({**d, "model_type": "qwen2", "sliding_window": 16})
    assert qwen.attention_bias is True
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        nld_config_from_hf({**d, "model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True})
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, qwen2, ministral3, nemotron_labs"):
        nld_config_from_hf({**d, "model_type": "gpt2"})
    llama = nld_config_from_hf({**d, "model_type": "llama"})
    assert auto_family(qwen) == "qwen2" and auto_family(llama) == "llama"
    assert hf_config_dict(qwen, "qwen2")["use_sliding_window"] is False
    assert {"attention_bias", "mlp_bias"} <= set(FAMILIES["llama"].export_fields)
    with pytest.raises(UnsupportedModelError, match="only the qwen2 family requires them"):
        hf_config_dict(llama, "qwen2")
    with pytest.raises(UnsupportedModelError, match="not one of"):
        hf_config_dict(llama, "nemotron_labs_diffusion")   # read only: no transformers class to export as
