"""``nld-convert from-hf <file.gguf>`` (issue 18 item 2): a GGUF file goes to a trainable checkpoint
in one command. The GGUF file is written in-test with the ``gguf`` package's writer from a tiny
random HF Llama (llama.cpp's tensor names and q/k row permutation, fp32 tensors, a byte-level BPE
tokenizer), so CI needs no download."""
import json

import pytest
import torch

from tests.test_convert import make_hf, megatron_logits

gguf = pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")
pytestmark = pytest.mark.usefixtures("one_thread")


def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert script reorders q/k rows for its RoPE layout (transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer_json, path):
    """The HF Llama ``model`` as a GGUF file, laid out as llama.cpp writes one."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tj = json.loads(tokenizer_json.read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    types = [gguf.TokenType.UNUSED] * c.vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for t, i in added.items():
        tokens[i], types[i] = t, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_eos_token_id(added["<|endoftext|>"])
    w.add_bos_token_id(added["<|endoftext|>"])
    w.add_pad_token_id(added["<|pad|>"])
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, hf, heads in (("attn_norm", "input_layernorm", 0), ("attn_q", "self_attn.q_proj", c.num_attention_heads),
                                ("attn_k", "self_attn.k_proj", c.num_key_value_heads), ("attn_v", "self_attn.v_proj", 0),
                                ("attn_output", "self_attn.o_proj", 0), ("ffn_norm", "post_attention_layernorm", 0),
                                ("ffn_gate", "mlp.gate_proj", 0), ("ffn_up", "mlp.up_proj", 0),
                                ("ffn_down", "mlp.down_proj", 0)):
            t = sd[p + hf + ".weight"]
            w.add_tensor(f"blk.{i}.{name}.weight", _llama_cpp_permute(t, heads) if heads else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    # head_dim = hidden / heads: transformers' GGUF reader derives it (it ignores attention.key_length)
    model = make_hf("llama", root / "hf", tie_word_embeddings=True, head_dim=12)
    write_gguf(model, root / "hf" / "tokenizer.json", root / "tiny.Q.gguf")
    return dict(model=model, file=root / "tiny.Q.gguf", root=root)


def test_gguf_converts_in_one_command_with_equal_logits(tiny_gguf, dist1, capsys):
    from transformers import AutoTokenizer

    from nld_train.convert.cli import main
    out = tiny_gguf["root"] / "nld"
    assert main(["from-hf", str(tiny_gguf["file"]), str(out), "--mask-token-id", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint.init_from={out} data.path=<your data>" in printed and "model." not in printed.split(
        "train from it with:")[1], printed
    step = out / "checkpoints" / "step_00000000"
    meta = json.loads((step / "nld_checkpoint.json").read_text())
    assert meta["hf_source"]["gguf"] is True and meta["hf_source"]["path"] == str(tiny_gguf["file"].resolve())
    assert meta["config"]["model"]["name"] == "hf_tiny.Q" and not list(out.parent.glob(".nld.gguf-*"))
    ids = torch.randint(0, 8200, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_gguf["model"](ids).logits
    got = megatron_logits(step, ids)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
    # the GGUF's tokenizer came along, with the mask token registered, and encodes as the original
    tok, orig = AutoTokenizer.from_pretrained(out / "tokenizer"), AutoTokenizer.from_pretrained(tiny_gguf["root"] / "hf")
    text = "Shall I compare thee to a summer's day?\nThou art more lovely"
    assert tok.mask_token_id == 1 and tok(text).input_ids == orig(text).input_ids


def test_a_file_that_is_not_gguf_is_refused(tiny_gguf, dist1, capsys):
    from nld_train.convert.cli import main
    bad = tiny_gguf["root"] / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["from-hf", str(bad), str(tiny_gguf["root"] / "o1"), "--mask-token-id", "1"]) == 2
    err = capsys.readouterr().err
    assert "junk.gguf" in err and "error" in err, err
    other = tiny_gguf["root"] / "weights.bin"
    other.write_bytes(b"x")
    assert main(["from-hf", str(other), str(tiny_gguf["root"] / "o2")]) == 2
    assert "an HF folder or a .gguf file" in capsys.readouterr().err
    assert not (tiny_gguf["root"] / "o1").exists() and not (tiny_gguf["root"] / "o2").exists()


def test_a_tokenizer_that_pads_with_eos_gets_its_own_pad_token():
    """SmolLM2's tokenizer pads with EOS, which training refuses (megatron masks pad positions out of
    the loss): the converter adds <|nld_pad|>, growing the rows by one (their mean)."""
    from types import SimpleNamespace

    from nld_train.convert.importer import ADDED_PAD_TOKEN, ensure_pad_token
    from nld_train.data.tokenizer import MegatronTokenizer, load_tokenizer
    from tests.conftest import REPO
    tok = load_tokenizer(REPO / "nld_train" / "assets" / "demo_tokenizer")
    tok.pad_token = tok.eos_token
    n = len(tok)
    cfg = SimpleNamespace(vocab_size=n)
    sd = {k: torch.randn(n, 4, generator=torch.Generator().manual_seed(i))
          for i, k in enumerate(("model.embed_tokens.weight", "lm_head.weight"))}
    before = {k: v.clone() for k, v in sd.items()}
    assert ensure_pad_token(tok, cfg, sd) == 1
    assert tok.pad_token == ADDED_PAD_TOKEN and tok.pad_token_id == n == cfg.vocab_size - 1
    for k, v in sd.items():
        assert v.shape == (n + 1, 4) and torch.equal(v[:n], before[k])
        assert torch.allclose(v[n], before[k].mean(0))
    MegatronTokenizer(tok)   # what training checks
    assert ensure_pad_token(tok, cfg, sd) == 0 and cfg.vocab_size == n + 1   # a distinct pad stays
