"""``nld-convert``: Hugging Face conversion both ways (docs/conversion.md).

    nld-convert to-hf <checkpoint> <out_dir> [--dtype bf16|fp32] [--layout hf|nld]
                      [--family llama|mistral|qwen2|ministral3|...] [--max-shard-size 5GB]
    nld-convert from-hf <hf_dir | file.gguf> <out_dir> [--tp N] [--mask-token-id N | --add-mask-token]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from nld_train.checkpoint import run_config
from nld_train.errors import InputError
from nld_train.inference.hf_format import EXPORT_FAMILIES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nld-convert", description="Hugging Face conversion both ways "
                                "(docs/conversion.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("to-hf", help="an nld-train checkpoint (run dir or step dir, any TP layout) -> an HF folder")
    t.add_argument("checkpoint")
    t.add_argument("out_dir")
    t.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="weights dtype (default: the checkpoint's own: fp32, or the dtype of the HF model it was "
                        "imported from)")
    t.add_argument("--layout", choices=["hf", "nld"], default="hf",
                   help="hf: standard names + our remote code (default); nld: the public Nemotron-Labs-Diffusion "
                        "layout (encoder.*, diffusion_head)")
    t.add_argument("--family", choices=EXPORT_FAMILIES, default=None,
                   help="config family for plain transformers (default: the imported model's, else derived "
                        "from the model: qwen2 with q/k/v biases, ministral3 with query scaling, llama otherwise)")
    t.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    f = sub.add_parser("from-hf", help="an HF Llama/Mistral/Qwen2/Ministral-3 or NLD folder, or a GGUF file of "
                       "one (dequantised to fp32) -> an nld-train checkpoint")
    f.add_argument("hf_dir", help="an HF folder, or a .gguf file (needs the gguf package: pip install -e '.[gguf]')")
    f.add_argument("out_dir")
    f.add_argument("--tp", type=int, default=1, help="pad the vocabulary for this tensor-parallel size (default 1)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="use this existing (reserved) token id as the mask token")
    g.add_argument("--add-mask-token", action="store_true",
                   help="add a new mask token to the tokenizer and grow the embeddings by one row")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false").items():
        os.environ.setdefault(k, v)   # conversion never needs a hub
    # lazy (see pyproject.toml): transformers reads the variables above when it is imported
    from nld_train.convert.export import peak_rss_gib, to_hf
    from nld_train.convert.importer import from_hf
    t0 = time.time()
    try:
        if args.cmd == "to-hf":
            to_hf(args.checkpoint, args.out_dir, dtype=args.dtype, layout=args.layout, family=args.family,
                  max_shard_size=args.max_shard_size)
        else:
            step = from_hf(args.hf_dir, args.out_dir, tp=args.tp, mask_token_id=args.mask_token_id,
                           add_mask_token=args.add_mask_token)
            # the model (and the tokenizer saved with it) come with checkpoint.init_from
            tok = run_config(step)["tokenizer"]["path"]
            print("train from it with:\n  nld-train recipe=<recipe> checkpoint.init_from=" + args.out_dir
                  + " data.path=<your data>" + ("" if tok else " tokenizer.path=<a tokenizer with the mask token>")
                  + (f" parallel.tensor_model_parallel_size={args.tp}" if args.tp > 1 else ""))
    except InputError as e:
        print(f"nld-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"nld-convert {args.cmd}: {time.time() - t0:.1f}s, peak RSS {peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
