"""nld-prepare-data: exact token counts, shards + sidecars, idempotent and resumable runs, chat loss
masks, refusal of damaged shards and of a mismatched tokenizer, and training on the result."""
import json
import os

import numpy as np
import pytest

from nld_train.data.indexed import LOSS_MASK_SUFFIX, check_data, read_sidecar, resolve_data_path
from nld_train.data.prepare import main, parse_args, prepare
from nld_train.data.tokenizer import DEMO_TOKENIZER, load_tokenizer
from nld_train.errors import DataError, InputError

WORDS = "the quick brown fox jumps over a lazy dog ROMEO JULIET thou art love night day é 🙂".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 60))) for _ in range(250)] + ["", "  \n\n x"]
    with open(d / "text.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    chats = []
    for i in range(40):
        msgs = [{"role": "user", "content": " ".join(rng.choice(WORDS, rng.integers(1, 20)))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS, rng.integers(1, 20)))}]
        if i % 4 == 0:
            msgs.insert(0, {"role": "system", "content": "terse"})
        chats.append(msgs)
    with open(d / "chat.jsonl", "w") as f:
        for m in chats:
            f.write(json.dumps({"messages": m}) + "\n")
    return d, texts, chats


def run(*args):
    return prepare(parse_args([f"tokenizer={DEMO_TOKENIZER}", *args]))


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    return [ds[i].astype(np.int64).tolist() for i in range(len(ds))]


def test_text_counts_shards_idempotence_and_resume(inputs, tok, tmp_path, capsys):
    d, texts, _ = inputs
    out = str(tmp_path / "out" / "text")
    m = run(f"input={d / 'text.jsonl'}", f"output={out}", "documents_per_shard=100", "num_proc=1")
    expected = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    assert m["status"] == "complete" and m["documents"] == len(texts) and len(m["shards"]) == 3
    # the shards' token count = the tokenizer's count of the documents + one separator each
    assert m["tokens"] == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts) + len(texts)
    shards, weights = resolve_data_path(out)
    assert weights is None and [os.path.basename(s) for s in shards] == ["text_00000", "text_00001", "text_00002"]
    assert [doc for s in shards for doc in read_docs(s)] == expected  # eos-separated, in input order
    side = read_sidecar(shards[1])
    assert side["rows"] == [100, 200] and side["tokenizer"]["vocab_size"] == len(tok)
    assert m["source"]["rows"] == len(texts) and m["field"] == "text"

    mtimes = {p: os.stat(p).st_mtime_ns for s in shards for p in (s + ".bin", s + ".idx")}
    capsys.readouterr()
    run(f"input={d / 'text.jsonl'}", f"output={out}", "documents_per_shard=100", "num_proc=1")
    assert "up to date" in capsys.readouterr().out
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in mtimes}  # nothing rewritten

    # an interrupted run: shard 1 never committed, manifest still in progress -> only shard 1 is redone
    os.remove(shards[1] + ".idx")
    meta = json.load(open(out + ".json"))
    meta["status"] = "in_progress"
    json.dump(meta, open(out + ".json", "w"))
    with pytest.raises(DataError, match="did not finish"):
        resolve_data_path(out)
    run(f"input={d / 'text.jsonl'}", f"output={out}", "documents_per_shard=100", "num_proc=2")  # 2 processes
    assert os.stat(shards[0] + ".bin").st_mtime_ns == mtimes[shards[0] + ".bin"]
    assert os.stat(shards[1] + ".bin").st_mtime_ns != mtimes[shards[1] + ".bin"]
    assert [doc for s in shards for doc in read_docs(s)] == expected
    assert json.load(open(out + ".json"))["status"] == "complete"

    # other arguments on the same output are refused, overwrite=true replaces
    with pytest.raises(DataError, match="other arguments"):
        run(f"input={d / 'text.jsonl'}", f"output={out}", "documents_per_shard=1000")
    m = run(f"input={d / 'text.jsonl'}", f"output={out}", "documents_per_shard=1000", "overwrite=true")
    assert len(m["shards"]) == 1 and read_docs(resolve_data_path(out)[0][0]) == expected


def test_chat_loss_mask_and_sft_check(inputs, tok, tmp_path):
    from nld_train.data.sft import ChatFormatter
    d, _, chats = inputs
    out = str(tmp_path / "chat")
    m = run(f"input={d / 'chat.jsonl'}", f"output={out}", "num_proc=1", "batch_size=16")
    expected = ChatFormatter(tok).encode_batch(chats)
    assert m["data"] == "chat" and m["tokens"] == sum(len(ids) for ids, _ in expected)
    (shard,), _ = resolve_data_path(out)
    assert read_docs(shard) == [ids for ids, _ in expected]
    assert read_docs(shard + LOSS_MASK_SUFFIX) == [mask for _, mask in expected]
    assert m["loss_tokens"] == sum(sum(mask) for _, mask in expected) > 0
    summary = check_data(out, tok, "sft")
    assert summary[0]["loss_tokens"] == m["loss_tokens"]
    with pytest.raises(DataError, match="data.format=sft"):
        check_data(out, tok, "gpt")  # pretraining would silently train on the prompts
    # a truncated loss mask is refused, naming the file
    with open(shard + LOSS_MASK_SUFFIX + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"chat_00000\.lossmask\.bin is corrupt"):
        check_data(out, tok, "sft")


def test_damaged_shard_and_mismatched_tokenizer_are_refused(inputs, tok, tmp_path):
    d, texts, _ = inputs
    other_dir = tmp_path / "other_tok"
    other = load_tokenizer(DEMO_TOKENIZER)
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(other_dir)
    out = str(tmp_path / "o")
    prepare(parse_args([f"tokenizer={other_dir}", f"input={d / 'text.jsonl'}", f"output={out}", "num_proc=1"]))
    with pytest.raises(DataError, match="tokenized with .*other_tok.* prepare the data with the model's tokenizer"):
        check_data(out, tok, "gpt")
    assert len(check_data(out, other, "gpt")) == 1
    (shard,), _ = resolve_data_path(out)
    with open(shard + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(shard + ".bin") - 2)
    with pytest.raises(DataError, match=r"o_00000\.bin is corrupt or incomplete"):
        check_data(out, other, "gpt")
    # the damaged shard is rebuilt by re-running, from the same manifest
    prepare(parse_args([f"tokenizer={other_dir}", f"input={d / 'text.jsonl'}", f"output={out}", "num_proc=1"]))
    assert check_data(out, other, "gpt")[0]["documents"] == len(texts)


def test_inputs_and_argument_errors(inputs, tmp_path, capsys):
    d, texts, _ = inputs
    import datasets
    ds = datasets.load_dataset("json", data_files=str(d / "text.jsonl"), split="train")
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part0.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[:5]):
        (tmp_path / "txt" / f"{i}.txt").write_text(t + "!")
    a = run(f"input={tmp_path / 'pq'}", f"output={tmp_path / 'a'}", "num_proc=1")
    b = run(f"input={tmp_path / 'disk'}", f"output={tmp_path / 'b'}", "num_proc=1")
    c = run(f"input={tmp_path / 'txt'}", f"output={tmp_path / 'c'}", "num_proc=1")
    assert a["tokens"] == b["tokens"] and a["documents"] == b["documents"] == len(texts)
    assert c["documents"] == 5 and c["source"]["builder"] == "text"

    assert main([f"input={d}", "output=x", f"tokenizer={DEMO_TOKENIZER}", "inptu=3"]) == 2
    assert "unknown key 'inptu'" in capsys.readouterr().err
    for args, msg in ((["input=a", "output=b"], "tokenizer=... is required"),
                      (["input=a", "output=b", "tokenizer=t", "num_proc=x"], "num_proc: 'x' is not a valid int")):
        with pytest.raises(InputError, match=msg):
            parse_args(args)
    with pytest.raises(DataError, match="does not exist"):
        run(f"input={tmp_path / 'missing.jsonl'}", f"output={tmp_path / 'm'}")
    with pytest.raises(DataError, match="field='body' is not a column"):
        run(f"input={d / 'text.jsonl'}", f"output={tmp_path / 'f'}", "field=body")
    with pytest.raises(DataError, match="holds int64, not text"):
        run(f"input={d / 'text.jsonl'}", f"output={tmp_path / 'f'}", "field=id")
    # foreign files at the output are never overwritten without overwrite=true
    (tmp_path / "mine.idx").write_text("x")
    with pytest.raises(DataError, match="refusing to overwrite"):
        run(f"input={d / 'text.jsonl'}", f"output={tmp_path / 'mine'}")


@pytest.mark.parametrize("data_format", ["gpt", "sft"])
def test_training_on_prepared_shards(dist1, inputs, tmp_path, data_format):
    """Two steps of the smoke recipe on prepared text (GPTDataset) or chat (packed SFT rows, joint
    objective): the AR count of a step is exactly the answer-target count of its rows."""
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    d, _, _ = inputs
    kind = "text" if data_format == "gpt" else "chat"
    out = str(tmp_path / kind)
    run(f"input={d / (kind + '.jsonl')}", f"output={out}", "num_proc=1")
    cfg = load_config(["recipe=smoke", f"run.dir={tmp_path / 'run'}", f"data.path={out}",
                       f"data.format={data_format}", "data.split='80,20,0'", "train.max_steps=2",
                       "train.global_batch_size=4", "train.eval_interval=2", "train.eval_iters=1",
                       "checkpoint.save_final=false"], world_size=1)
    tr = Trainer(cfg)
    try:
        preps, counts = tr._prepare(tr.train_ds, 0)
        rows = [tr.train_ds[i] for i in range(4)]
        assert counts[0] == sum(float(r["loss_mask"].sum()) for r in rows)
        if data_format == "sft":
            assert all(p.document_ids is not None for p in preps)
            assert counts[0] < 4 * cfg.train.seq_length  # prompts and padding carry no AR loss
            answer_tokens = sum(float(r["loss_mask"].sum()) for r in rows)
            assert counts[1] <= answer_tokens + 4  # only answer tokens are noised
        tr.fit()
        rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
        assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
        assert "val_loss_ar" in rows[-1] and "val_loss_diff" in rows[-1]
    finally:
        tr.close()
