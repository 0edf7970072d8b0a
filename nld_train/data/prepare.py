"""``nld-prepare-data input=<file|folder|dataset> output=<prefix> tokenizer=<path or name> [key=value ...]``

Reads any `datasets` source (jsonl/json/parquet/arrow/csv/text files or folders of them, a
`save_to_disk` folder, or a hub dataset name), tokenizes a text field (documents) or a messages field
(chat, with an answer mask) in `num_proc` processes, and writes megatron indexed shards:

    <output>_00000.bin/.idx (+ .lossmask.bin/.idx for chat) + <output>_00000.json   one per shard
    <output>.json                                                                  the manifest

Every document ends with the tokenizer's eos token. Shards cover fixed row ranges
(`documents_per_shard`), each written atomically; the manifest says "in_progress" until the last one
is committed. Re-running with the same arguments skips finished shards (an interrupted run restarts
where it stopped; a finished one does nothing); other arguments on an existing output are refused
unless overwrite=true. Train with `data.path=<output>` (plus `data.format=sft` for chat data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from nld_train.children import exit_with_parent
from nld_train.data.sft import DEFAULT_CHAT_TEMPLATE, ChatFormatter
from nld_train.data.tokenizer import load_tokenizer, tokenizer_identity
from nld_train.errors import DataError, InputError

USAGE = """usage: nld-prepare-data input=<file|folder|dataset> output=<prefix> tokenizer=<path or name> [key=value ...]

keys (defaults):
{keys}
Docs: docs/data.md"""

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
               ".arrow": "arrow", ".csv": "csv", ".txt": "text", ".txt.gz": "text", ".md": "text"}


@dataclass
class PrepareConfig:
    input: str = ""           # a file, a folder of files, a save_to_disk folder, or a hub dataset name
    output: str = ""          # output prefix: <output>.json manifest, <output>_NNNNN shards
    tokenizer: str = ""       # a tokenizer folder (nld-train's or any transformers one) or a hub name
    field: str = "auto"       # column to read; auto: "messages" (chat) if present, else "text"
    input_format: str = "auto"  # json | parquet | arrow | csv | text | disk | hub; auto: from the input
    split: str = "train"      # the datasets split to read
    text_sample_by: str = "document"  # text files: one document per file, "paragraph" or "line"
    chat_template: Optional[str] = None  # a Jinja file; None: the tokenizer's, else DEFAULT_CHAT_TEMPLATE
    num_proc: int = 0         # tokenizer processes; 0 = every CPU this process may use
    batch_size: int = 1000    # rows per tokenizer call
    documents_per_shard: int = 1_000_000
    overwrite: bool = False   # replace an output prepared with other arguments


KEY_HELP = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}


def parse_args(argv: list[str]) -> PrepareConfig:
    values: dict = {}
    names = [f.name for f in dataclasses.fields(PrepareConfig)]
    types = {f.name: f.type for f in dataclasses.fields(PrepareConfig)}
    for arg in argv:
        if "=" not in arg:
            raise InputError(f"arguments are key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        if key not in names:
            raise InputError(f"unknown key {key!r}; allowed: {', '.join(names)}")
        kind = types[key]
        try:
            if kind == "int":
                values[key] = int(value)
            elif kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                values[key] = value.lower() in ("true", "1")
            elif kind == "Optional[str]":
                values[key] = None if value.lower() in ("", "null", "none") else value
            else:
                values[key] = value
        except ValueError:
            raise InputError(f"{key}: {value!r} is not a valid {kind}") from None
    cfg = PrepareConfig(**values)
    for key in ("input", "output", "tokenizer"):
        if not getattr(cfg, key):
            raise InputError(f"{key}=... is required")
    if cfg.num_proc < 0 or cfg.batch_size < 1 or cfg.documents_per_shard < 1:
        raise InputError("num_proc must be >= 0, batch_size and documents_per_shard >= 1")
    if cfg.input_format not in ("auto", "disk", "hub", *set(_EXTENSIONS.values())):
        raise InputError(f"input_format: {cfg.input_format!r} is not one of auto, disk, hub, "
                         f"{', '.join(sorted(set(_EXTENSIONS.values())))}")
    if cfg.text_sample_by not in ("document", "paragraph", "line"):
        raise InputError(f"text_sample_by: {cfg.text_sample_by!r} is not one of document, paragraph, line")
    return cfg


# ----------------------------------------------------------------------------------------- input


def _builder_of(path: Path) -> str | None:
    name = path.name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def load_source(cfg: PrepareConfig):
    """(datasets.Dataset, description) for `input`."""
    import datasets

    path = Path(cfg.input).expanduser()
    fmt = cfg.input_format
    desc: dict = {"input": cfg.input, "split": cfg.split}
    try:
        if fmt == "disk" or (fmt == "auto" and path.is_dir() and any(
                (path / n).is_file() for n in ("state.json", "dataset_dict.json"))):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{cfg.input} has splits {list(ds)}, not split={cfg.split!r}")
                ds = ds[cfg.split]
            desc.update(kind="save_to_disk", path=str(path.resolve()))
        elif path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                         and not p.name.startswith(".") and _builder_of(p))
            if not files:
                raise DataError(f"{cfg.input} holds no files with a known extension ({', '.join(_EXTENSIONS)})")
            builders = {fmt} if fmt != "auto" else {_builder_of(f) for f in files}
            if None in builders:
                raise DataError(f"cannot tell the format of {files[0]}: set input_format=")
            if len(builders) > 1:
                raise DataError(f"{cfg.input} mixes formats {sorted(builders)}: prepare each on its own, or set input_format=")
            builder = builders.pop()
            kw = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kw)
            desc.update(kind="files", builder=builder, files=[{"path": str(f.resolve()), "bytes": f.stat().st_size}
                                                              for f in files[:1000]], num_files=len(files))
        elif fmt == "hub" or (fmt == "auto" and not cfg.input.startswith(("/", ".", "~")) and not _builder_of(path)):
            ds = datasets.load_dataset(cfg.input, split=cfg.split)
            desc.update(kind="hub", name=cfg.input)
        else:
            raise DataError(f"input {cfg.input!r} does not exist")
    except InputError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetGenerationError, ...)
        raise DataError(f"cannot read input {cfg.input!r}: {type(err).__name__}: {err}") from None
    desc.update(rows=len(ds), fingerprint=getattr(ds, "_fingerprint", None))
    return ds, desc


def pick_field(ds, field: str) -> tuple[str, str]:
    """(column, "text" | "chat")."""
    columns = list(ds.column_names)
    if field == "auto":
        field = next((c for c in ("messages", "text") if c in columns), None)
        if field is None:
            raise DataError(f"no 'messages' or 'text' column in {columns}: choose one with field=<column>")
    if field not in columns:
        raise DataError(f"field={field!r} is not a column of the input; columns: {columns}")
    feature = ds.features[field]
    import datasets
    if isinstance(feature, datasets.Value):
        if feature.dtype not in ("string", "large_string"):
            raise DataError(f"column {field!r} holds {feature.dtype}, not text")
        return field, "text"
    if isinstance(feature, (list, datasets.Sequence, getattr(datasets, "List", ()), getattr(datasets, "LargeList", ()))):
        return field, "chat"
    raise DataError(f"column {field!r} has type {feature}: need a string (text) or a list of messages (chat)")


def load_any_tokenizer(name: str):
    if Path(name).expanduser().is_dir():
        return load_tokenizer(name)
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise DataError(f"tokenizer {name!r} is not a folder")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise DataError(f"cannot load tokenizer {name!r} (not a local folder; from the hub: {err})") from None


# ------------------------------------------------------------------------------------ tokenizing

_WORK: dict = {}


def _init_worker(ds, tokenizer, field, kind, template, eos) -> None:
    _WORK.update(ds=ds, tokenizer=tokenizer, field=field, kind=kind, eos=eos,
                 chat=ChatFormatter(tokenizer, template) if kind == "chat" else None)


def _init_pool_worker(parent_pid: int, *args) -> None:
    # a pool worker waits for work forever: without this it outlives a killed nld-prepare-data
    exit_with_parent(parent_pid)
    _init_worker(*args)


def _tokenize_rows(rows: tuple[int, int]):
    """Rows [start, end) -> (ids, lengths, answer mask or None) as flat numpy arrays."""
    start, end = rows
    w = _WORK
    values = w["ds"][start:end][w["field"]]
    if w["kind"] == "text":
        for j, text in enumerate(values):
            if not isinstance(text, str):
                raise DataError(f"row {start + j}: field {w['field']!r} is {type(text).__name__}, not text")
        enc = w["tokenizer"](values, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        docs = [ids + [w["eos"]] for ids in enc]
        masks = None
    else:
        pairs = w["chat"].encode_batch(values, first_row=start)
        docs = [ids for ids, _ in pairs]
        masks = np.fromiter((m for _, mask in pairs for m in mask), dtype=np.uint8)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((i for d in docs for i in d), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths, masks


# --------------------------------------------------------------------------------------- writing


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard_done(shard: str, fingerprint: str, kind: str) -> dict | None:
    """The shard's sidecar when the shard is complete, intact and from these arguments."""
    from nld_train.data.indexed import read_sidecar, validate_indexed_prefix, validate_loss_mask
    try:
        meta = read_sidecar(shard)
        if meta is None or meta.get("fingerprint") != fingerprint:
            return None
        validate_indexed_prefix(shard)
        if kind == "chat":
            validate_loss_mask(shard)
    except DataError:
        return None
    return meta


def prepare(cfg: PrepareConfig) -> dict:
    """Run the preparation; returns the manifest. The caller's TOKENIZERS_PARALLELISM (set to false
    for the worker processes) is restored, so commands it starts later are not affected."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        return _prepare(cfg)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _prepare(cfg: PrepareConfig) -> dict:
    from nld_train.data.indexed import (
        LOSS_MASK_SUFFIX,
        SIDECAR_FORMAT,
        IndexedWriter,
        read_sidecar,
        token_dtype,
        write_json_atomic,
    )

    t_start = time.perf_counter()
    output = str(Path(cfg.output).expanduser().resolve())
    name = os.path.basename(output)
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    if num_proc > 1:  # the processes are the parallelism; the Rust pool inside each would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_any_tokenizer(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {cfg.tokenizer!r} has no eos token (the document separator)")
    ds, source = load_source(cfg)
    if len(ds) == 0:
        raise DataError(f"input {cfg.input!r} has no rows")
    field, kind = pick_field(ds, cfg.field)
    template = None
    if kind == "chat":
        if cfg.chat_template:
            try:
                template = Path(cfg.chat_template).expanduser().read_text()
            except OSError as err:
                raise DataError(f"chat_template: cannot read {cfg.chat_template!r}: {err}") from None
        else:
            template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    ident = tokenizer_identity(tokenizer)
    vocab = len(tokenizer)
    fingerprint = _fingerprint({"source": source.get("fingerprint") or source, "field": field, "kind": kind,
                                "tokenizer": ident["tokenizer_sha256"] or ident["vocab_sha256"],
                                "template": template, "documents_per_shard": cfg.documents_per_shard,
                                "text_sample_by": cfg.text_sample_by, "version": SIDECAR_FORMAT})

    # never write over something that is not an unfinished or identical run of ours
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    old = read_sidecar(output)
    n_rows = len(ds)
    n_shards = -(-n_rows // cfg.documents_per_shard)
    shards = [f"{output}_{i:05d}" for i in range(n_shards)]
    if old is not None and old.get("fingerprint") != fingerprint and not cfg.overwrite:
        raise DataError(f"{output}.json was prepared with other arguments or another input/tokenizer; "
                        "use another output=, or overwrite=true to replace it")
    if old is None and not cfg.overwrite:
        foreign = [p for p in (output, shards[0]) if os.path.exists(p + ".idx") or os.path.exists(p + ".bin")]
        if foreign:
            raise DataError(f"{foreign[0]}.bin/.idx exist but no {output}.json manifest: refusing to overwrite "
                            "data nld-prepare-data did not write (overwrite=true replaces it)")
    manifest = {"format": SIDECAR_FORMAT, "kind": "manifest", "status": "in_progress", "fingerprint": fingerprint,
                "data": kind, "field": field, "tokenizer": ident, "source": source,
                "chat_template": template, "documents_per_shard": cfg.documents_per_shard,
                "shards": [], "documents": 0, "tokens": 0, "loss_tokens": 0}
    same = old is not None and old.get("fingerprint") == fingerprint
    done = {i: _shard_done(s, fingerprint, kind) for i, s in enumerate(shards)} if same else {i: None for i in range(n_shards)}
    todo = [i for i, meta in done.items() if meta is None]
    if same and not todo and old.get("status") == "complete":
        print(f"nld-prepare-data: {output} is up to date ({old['documents']:,} documents, {old['tokens']:,} tokens "
              f"in {len(old['shards'])} shards)", flush=True)
        return old
    if not same or old.get("status") == "complete":  # new output, replaced output, or a damaged shard to redo
        write_json_atomic(output + ".json", manifest)

    from tqdm.auto import tqdm
    skipped_rows = sum(min(cfg.documents_per_shard, n_rows - i * cfg.documents_per_shard)
                       for i in range(n_shards) if done[i] is not None)
    bar = tqdm(total=n_rows, initial=skipped_rows, unit="doc", desc=f"tokenizing {name}", dynamic_ncols=True,
               file=sys.stderr, mininterval=1.0)
    eos = tokenizer.eos_token_id
    args = (ds, tokenizer, field, kind, template, eos)
    pool = None
    if num_proc > 1:
        import multiprocessing
        # fork: the workers inherit the memory-mapped dataset and the loaded tokenizer
        pool = multiprocessing.get_context("fork").Pool(num_proc, _init_pool_worker, (os.getpid(), *args))
    else:
        _init_worker(*args)
    tokens_new, t_tok = 0, time.perf_counter()
    try:
        for i in todo:
            lo, hi = i * cfg.documents_per_shard, min((i + 1) * cfg.documents_per_shard, n_rows)
            batches = [(s, min(s + cfg.batch_size, hi)) for s in range(lo, hi, cfg.batch_size)]
            results = pool.imap(_tokenize_rows, batches) if pool else map(_tokenize_rows, batches)
            with IndexedWriter(shards[i], token_dtype(vocab)) as tok_w, \
                    (IndexedWriter(shards[i] + LOSS_MASK_SUFFIX, np.uint8) if kind == "chat" else _Null()) as mask_w:
                loss_tokens = 0
                for flat, lengths, masks in results:
                    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
                        raise DataError(f"token ids outside [0, {vocab}) in shard {i}")
                    tok_w.add_documents(flat, lengths)
                    if masks is not None:
                        mask_w.add_documents(masks, lengths)
                        loss_tokens += int(np.count_nonzero(masks))
                    tokens_new += flat.size
                    bar.update(len(lengths))
                    bar.set_postfix_str(f"{tokens_new / (time.perf_counter() - t_tok):,.0f} tok/s", refresh=False)
                if kind == "chat":
                    mask_w.commit()
                else:
                    loss_tokens = tok_w.tokens
                tok_w.commit()
            done[i] = {"format": SIDECAR_FORMAT, "kind": "shard", "fingerprint": fingerprint, "shard": i,
                       "rows": [lo, hi], "documents": tok_w.documents, "tokens": tok_w.tokens,
                       "loss_tokens": loss_tokens, "loss_mask": kind == "chat", "tokenizer": ident}
            write_json_atomic(shards[i] + ".json", done[i])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    manifest.update(status="complete",
                    shards=[{"name": os.path.basename(s), "documents": done[i]["documents"], "tokens": done[i]["tokens"],
                             "loss_tokens": done[i]["loss_tokens"]} for i, s in enumerate(shards)],
                    documents=sum(m["documents"] for m in done.values()), tokens=sum(m["tokens"] for m in done.values()),
                    loss_tokens=sum(m["loss_tokens"] for m in done.values()))
    write_json_atomic(output + ".json", manifest)
    seconds = time.perf_counter() - t_start
    tok_seconds = time.perf_counter() - t_tok
    print(f"nld-prepare-data: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens"
          + (f" ({manifest['loss_tokens']:,} answer tokens)" if kind == "chat" else "")
          + f" in {n_shards} shard(s) -> {output} ({seconds:.1f} s; {tokens_new / max(tok_seconds, 1e-9):,.0f} tokens/s "
          f"with num_proc={num_proc})", flush=True)
    print(f"train with: data.path={output}" + (" data.format=sft" if kind == "chat" else ""), flush=True)
    return manifest


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        keys = "\n".join(f"  {k}={v}" for k, v in KEY_HELP.items())
        print(USAGE.format(keys=keys))
        return 0 if argv else 2
    import warnings
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*")  # megatron's import-time notes
    try:
        prepare(parse_args(argv))
    except InputError as err:
        print(f"nld-prepare-data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
