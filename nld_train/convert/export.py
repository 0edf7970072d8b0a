"""``nld-convert to-hf``: an nld-train checkpoint (any TP/DP layout) -> a Hugging Face folder.

The checkpoint is gathered into one process through :func:`nld_train.inference.load_model`
(megatron reshards any saved TP layout into a TP=1 model, the mapping table of
:mod:`.mapping` splits fused QKV / fc1 and strips the vocabulary padding). The folder holds:

- ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (size-limited shards)
- ``config.json`` (a standard Llama / Mistral / Qwen2 / Ministral-3 config + the NLD fields and
  ``auto_map``), ``generation_config.json``
- tokenizer files with the mask token registered
- the remote code: ``hf_wrapper.py`` and the inference files it imports (copied, imports made relative)
- ``README.md`` (model card stub with the training summary)
- ``sampler/`` and ``linear_spec_lora/`` when the run dir holds them (learned sampler, LoRA drafter)

It is written into a temporary sibling folder and renamed at the end; an existing non-empty
``out_dir`` is refused, never overwritten.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from nld_train.atomic import atomic_dir
from nld_train.checkpoint import read_meta, run_config
from nld_train.data.tokenizer import load_tokenizer
from nld_train.dist import preserved_environ
from nld_train.errors import CheckpointError, InputError
from nld_train.inference.hf_format import (
    EXPORT_FAMILIES,
    LAYOUTS,
    NLD_PUBLIC_MODEL_TYPE,
    UnsupportedModelError,
    auto_family,
    hf_config_dict,
    to_layout,
)
from nld_train.inference.loading import load_model, resolve_checkpoint

REMOTE_CODE_ENTRY = "nld_train.inference.hf_wrapper"
# run-dir artifacts shipped as subfolders of the export when present (learned sampler, LoRA drafter)
ARTIFACT_DIRS = ("sampler", "linear_spec_lora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# "from nld_train.x import a, b" on one line, or parenthesised over several (as ruff wraps long ones)
_IMPORT_HEAD = re.compile(r"^([ \t]*)from[ \t]+(nld_train(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|.*)$", re.MULTILINE)


# -- remote code ----------------------------------------------------------------------------------
def _module_file(name: str) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):   # a name inside a module, not a module
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def remote_code_sources(entry: str = REMOTE_CODE_ENTRY) -> dict:
    """``{file name: source}`` of ``entry`` and every nld_train module it imports (transitively,
    also imports inside functions), with those imports rewritten to relative ones (flat folder)."""
    out, origin, todo = {}, {}, [entry]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None:
            raise RuntimeError(f"remote code: module {name} has no source file")
        fname = name.rsplit(".", 1)[-1] + ".py"
        if fname in origin:
            if origin[fname] != name:
                raise RuntimeError(f"remote code: {origin[fname]} and {name} would both be {fname}")
            continue
        origin[fname] = name

        def rewrite(m, name=name):   # called at once, inside this iteration
            indent, mod, names = m.groups()
            # "from nld_train.pkg import submodule as alias"
            subs = [n.split(" as ")[0].strip() for n in names.strip("() \n").split(",") if n.strip()]
            if all(_module_file(f"{mod}.{s}") for s in subs):
                todo.extend(f"{mod}.{s}" for s in subs)
                return f"{indent}from . import {names}"
            if _module_file(mod) is not None and mod != "nld_train":
                todo.append(mod)
                return f"{indent}from .{mod.rsplit('.', 1)[-1]} import {names}"
            raise RuntimeError(f"remote code: cannot ship the import {m.group(0).strip()!r} of {name}")

        src = _IMPORT_HEAD.sub(rewrite, path.read_text())
        left = [ln for ln in src.splitlines() if re.match(r"\s*(from|import)\s+nld_train", ln)]
        if left:
            raise RuntimeError(f"remote code: {name} keeps absolute imports {left}")
        out[fname] = src
    return out


def write_remote_code(out_dir: Path) -> list:
    files = remote_code_sources()
    for fname, src in files.items():
        (out_dir / fname).write_text(src)
    # transformers copies only the files it finds through `from .x import` lines: check it finds all
    from transformers.dynamic_module_utils import get_relative_import_files
    entry = out_dir / (REMOTE_CODE_ENTRY.rsplit(".", 1)[-1] + ".py")
    found = {Path(p).name for p in get_relative_import_files(str(entry))} | {entry.name}
    if found != set(files):
        raise RuntimeError(f"remote code: transformers would copy {sorted(found)}, the export holds {sorted(files)}")
    return sorted(files)


# -- weights --------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"--max-shard-size: {text!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def write_safetensors(tensors: dict, out_dir: Path, max_shard_bytes: int) -> int:
    """Shards of at most ``max_shard_bytes`` (a larger single tensor gets its own) + the HF index."""
    from safetensors.torch import save_file
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out_dir / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return len(shards)


# -- the rest of the folder -----------------------------------------------------------------------
def _export_tokenizer(tok_path, mask_token_id: int, out_dir: Path):
    tok = load_tokenizer(tok_path)
    if tok.mask_token_id is None:  # register the model's mask id under its existing token text
        tok.add_special_tokens({"mask_token": tok.convert_ids_to_tokens(mask_token_id)})
    if tok.mask_token_id != mask_token_id:
        raise CheckpointError(f"the tokenizer {tok_path} has mask token id {tok.mask_token_id}, the model "
                              f"{mask_token_id}")
    tok.save_pretrained(str(out_dir))
    return tok


def _training_summary(step_dir: Path, meta: dict, conf: dict) -> list:
    t, o = conf.get("train", {}), conf.get("objective", {})
    lines = [f"- recipe: `{meta.get('recipe') or conf.get('recipe') or '?'}`, step {meta.get('step')}, "
             f"objective `{o.get('name')}` (alpha {o.get('alpha')}, training block size {o.get('block_size')})"]
    if meta.get("consumed_samples") is not None and t.get("seq_length"):
        lines.append(f"- consumed samples: {meta['consumed_samples']} "
                     f"({meta['consumed_samples'] * t['seq_length']:,} tokens at seq_length {t['seq_length']})")
    metrics = step_dir.parent.parent / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        last = [r for r in rows if r.get("step") == meta.get("step")] or rows[-1:]
        if last:
            keys = ("loss", "loss_ar", "loss_diff")
            lines.append("- last logged: " + ", ".join(f"{k} {last[-1][k]:.4f}" for k in keys
                                                       if isinstance(last[-1].get(k), (int, float))))
    if meta.get("hf_source"):
        lines.append(f"- initialised from the HF model `{meta['hf_source'].get('path')}` "
                     f"({meta['hf_source'].get('model_type')})")
    lines.append(f"- data: `{(conf.get('data') or {}).get('path')}`; tokenizer: `{(conf.get('tokenizer') or {}).get('path')}`")
    return lines


def _model_card(name: str, family: str, layout: str, summary: list, cfg) -> str:
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained(\"{name}\")\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{name}\", trust_remote_code=True)\n"
            "ids = tok(\"ROMEO:\", return_tensors=\"pt\").input_ids\n"
            "out, nfe = model.linear_spec_generate(ids, max_new_tokens=64)   # or ar_generate / generate / "
            "quadratic_spec_generate\n")
    return "\n".join([
        "---", "library_name: transformers", "tags: [nld-train, diffusion-lm, block-diffusion, self-speculation]", "---",
        f"# {name}", "",
        "A Nemotron-Labs-Diffusion-style model trained with nld-train: one set of weights decodes "
        "autoregressively, by block diffusion and by linear / quadratic self-speculation.", "",
        "## Training summary", *summary, "",
        "## Model", f"- layout `{layout}`, family `{family}`: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, head_dim "
        f"{cfg.head_dim}, vocab {cfg.vocab_size}, mask token id {cfg.mask_token_id}", "",
        "## Use",
        "AR mode loads as a standard causal LM (`AutoModelForCausalLM.from_pretrained(path)`, vLLM, SGLang)." if layout == "hf"
        else "This folder uses the public Nemotron-Labs-Diffusion layout: add its remote code files to load it.",
        "", "```python", load, "```", ""])


@preserved_environ()  # a library call: the caller's environment stays as it was
def to_hf(checkpoint, out_dir, dtype: Optional[str] = None, layout: str = "hf", family: Optional[str] = None,
          max_shard_size: str = "5GB") -> Path:
    """Export ``checkpoint`` (run dir or step dir) to the HF folder ``out_dir``; returns its path."""

    out_dir = Path(out_dir)
    if layout not in LAYOUTS:
        raise InputError(f"--layout: {layout!r} is not one of {sorted(LAYOUTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty: choose another folder or remove it")
    max_bytes = parse_size(max_shard_size)
    step_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    conf = run_config(step_dir, meta)
    src = meta.get("hf_source") or {}
    dtype = dtype or src.get("dtype") or "fp32"   # the checkpoint's own: fp32 masters, or the imported dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"checkpoint {step_dir}: unknown recorded dtype {dtype!r}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a missing tokenizer is reported below, once
        model = load_model(step_dir, dtype=torch.float32)
    cfg = model.config
    if layout == "nld":
        if cfg.attention_bias:
            raise InputError("--layout nld: the public NLD layout has no q/k/v biases (this model has them)")
        # the public release's config is Mistral's (Ministral-3's with query scaling)
        family = family or ("ministral3" if cfg.query_scaling_beta else "mistral")
    if not family and src.get("model_type") in EXPORT_FAMILIES:   # back to the family it was imported from
        family = src["model_type"]
    family = family or auto_family(cfg)

    # out_dir is absent or empty (checked above): publish by one rename, never over files that appeared meanwhile
    with atomic_dir(out_dir, replace=False) as tmp:
        tok_path = (conf.get("tokenizer") or {}).get("path")
        tok = None
        if tok_path and Path(tok_path).is_dir():
            tok = _export_tokenizer(tok_path, cfg.mask_token_id, tmp)
        else:
            print(f"warning: tokenizer {tok_path!r} of {step_dir} not found: the export has no tokenizer files")
        bos = getattr(tok, "bos_token_id", None) if tok is not None else src.get("bos_token_id")
        pad = getattr(tok, "pad_token_id", None) if tok is not None else src.get("pad_token_id")
        try:
            d = hf_config_dict(cfg, family, bos_token_id=bos, pad_token_id=pad)
        except UnsupportedModelError as e:
            raise InputError(f"--family: {e}") from None
        d["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        if layout == "hf":
            d["auto_map"] = {"AutoConfig": "hf_wrapper.NLDHFConfig", "AutoModelForCausalLM": "hf_wrapper.NLDHFForCausalLM"}
            write_remote_code(tmp)
        else:   # the public release's config fields (spec §4); its remote code is not ours to ship
            o = conf.get("objective") or {}
            d.update(model_type=NLD_PUBLIC_MODEL_TYPE, nld_family=NLD_PUBLIC_MODEL_TYPE,
                     architectures=["NemotronLabsDiffusionModel"],
                     auto_map={"AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
                               "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"},
                     dlm_paradigm="bidirectional", dlm_loss_weight=o.get("alpha"), ar_loss_weight=o.get("ar_weight", 1.0),
                     dp_varying_mask_ratio=False, use_cache=False)
            # the public attention reads both keys for every model: without query scaling, beta 0
            # makes its scale exactly 1 (and the importer reads beta 0 back as no scaling)
            rp = d["rope_parameters"]
            rp.setdefault("llama_4_scaling_beta", 0.0)
            rp.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
            if not rp["original_max_position_embeddings"] > 0:
                raise InputError("--layout nld: rope_parameters.original_max_position_embeddings must be > 0 "
                                 f"(model.max_position_embeddings={d['max_position_embeddings']})")
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": cfg.eos_token_id, "pad_token_id": pad, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                               indent=2) + "\n")
        tensors = {to_layout(k, layout): v.to(DTYPES[dtype]) for k, v in model.state_dict().items()}
        del model
        n_shards = write_safetensors(tensors, tmp, max_bytes)
        del tensors
        run_dir = step_dir.parent.parent
        for art in ARTIFACT_DIRS:
            if (run_dir / art).is_dir():
                shutil.copytree(run_dir / art, tmp / art)
        (tmp / "README.md").write_text(_model_card(out_dir.name, family, layout,
                                                   _training_summary(step_dir, meta, conf), cfg))
    print(f"exported {step_dir} -> {out_dir}: layout {layout}, family {family}, {dtype}, {n_shards} shard(s)")
    return out_dir


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
