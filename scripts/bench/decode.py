"""Decoding speed per mode: tokens/s, TPF and the ratio to AR, at batch 1 and larger batches.

    python scripts/bench/decode.py --checkpoint runs/demo/stage2 [--batch-sizes 1 4 8]

Every registered mode (AR, block diffusion, linear and quadratic self-speculation) decodes the same
left-padded prompt batch, greedy; modes alternate within each repeat so they see the same machine
load, and the median tokens/s of ``--repeats`` calls is reported with TPF (generated tokens per
forward pass, from ``model.last_stats``), NFE, tokens per draft pass, the speed ratio to AR at the
same batch size, and whether the text equals AR's (greedy self-speculation must always say yes).

Then the cost of the forward kinds the modes are made of, over a cache of prompt + generated
context (at batch 1): an AR step (1 token, causal, cache kept), the causal "write KV" pass of one
block (block diffusion's KV-write, self-speculation's verify), the bidirectional block pass
(denoise / draft), and a cache crop (rejected drafts dropped), each also as a multiple of an AR step.

Without --checkpoint a randomly initialised model of the demo ("tiny") shape is used: timings and
the forward-pass costs are meaningful, TPF is not (nothing was trained).
"""
from __future__ import annotations

import argparse
import sys

import _common as C

# standard library only (no torch): safe to import before C.setup_env()
from nld_train.decoding_modes import decode, get_mode, mode_names

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING HENRY V:", "HAMLET:\nTo be, or not to be", "MACBETH:", "Enter the Ghost.", "KING LEAR:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", default=None, help="run dir, step dir or HF export (default: random tiny model)")
    p.add_argument("--modes", nargs="+", choices=mode_names(), default=list(mode_names()),
                   help="modes (default: all registered)")
    p.add_argument("--batch-sizes", type=C.positive_int, nargs="+", default=[1, 4, 8],
                   help="batch sizes (default: 1 4 8); prompts are cycled to fill a batch")
    p.add_argument("--max-new-tokens", type=C.positive_int, default=64, help="tokens per row (64)")
    p.add_argument("--block-length", type=C.positive_int, default=None,
                   help="decoding block length (default: the model's training block size)")
    p.add_argument("--threshold", type=float, default=0.9, help="block-diffusion confidence threshold (0.9)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: 8 Shakespeare openings)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per mode and batch size (1)")
    p.add_argument("--repeats", type=C.positive_int, default=3, help="timed calls; median (3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=C.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--context", type=C.positive_int, default=128,
                   help="cache length for the forward-kind costs (128)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def load(args, device, dtype):
    from nld_train.inference import NLDConfig, NLDForDecoding, load_model, load_tokenizer
    if args.checkpoint:
        return load_model(args.checkpoint, device=device, dtype=dtype), load_tokenizer(args.checkpoint)
    model = NLDForDecoding.random(NLDConfig(), seed=0, dtype=dtype).to(device)
    return model, None


def batch(args, tok, b, device, vocab):
    import torch

    from nld_train.inference.table import encode_batch
    prompts = [(args.prompt or PROMPTS)[i % len(args.prompt or PROMPTS)] for i in range(b)]
    if tok is not None:
        return encode_batch(tok, prompts, device)
    g = torch.Generator().manual_seed(b)  # random model: random prompts of the same lengths
    lens = [4 + len(p) // 4 for p in prompts]
    P = max(lens)
    ids = torch.randint(2, vocab, (b, P), generator=g)
    mask = torch.arange(P)[None] >= (P - torch.tensor(lens))[:, None]
    return ids.to(device), mask.long().to(device)


def bench_modes(args, model, tok, b, block, device):
    ids, mask = batch(args, tok, b, device, model.config.vocab_size)
    P = ids.shape[1]
    runs = {m: [] for m in args.modes}
    texts = {}
    for r in range(args.warmup + args.repeats):
        for mode in args.modes:
            out, nfe = decode(model, mode, ids, args.max_new_tokens, block, args.threshold, attention_mask=mask)
            st = model.last_stats
            texts[mode] = [out[i, P:P + n].tolist() for i, n in enumerate(st.new_tokens)]
            if r >= args.warmup:
                runs[mode].append(dict(seconds=st.seconds, tokens=sum(st.new_tokens), nfe=nfe, tpf=st.tpf,
                                       accepted=st.mean_accepted))
    rows = {}
    for mode in args.modes:
        rs = runs[mode]
        sec = C.median([x["seconds"] for x in rs])
        rows[mode] = dict(batch=b, mode=mode, seconds=sec, tokens=rs[-1]["tokens"], tokens_per_s=rs[-1]["tokens"] / sec,
                          tpf=rs[-1]["tpf"], nfe=rs[-1]["nfe"], tokens_per_draft=rs[-1]["accepted"],
                          same_as_ar=(sum(t == a for t, a in zip(texts[mode], texts["ar"], strict=True)) if "ar" in texts else None))
    for row in rows.values():
        row["speed_vs_ar"] = row["tokens_per_s"] / rows["ar"]["tokens_per_s"] if "ar" in rows else None
    return list(rows.values())


def forward_costs(args, model, tok, block, device):
    """Median ms of the forward kinds over a cache of ``--context`` tokens, batch 1."""
    import torch

    ids, mask = batch(args, tok, 1, device, model.config.vocab_size)
    ctx = torch.randint(2, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, ctx.to(device)], 1)[:, -args.context:]
    with torch.no_grad():
        cache = model.new_cache(1, args.context + 2 * block)
        model.causal_pass(ids, cache, logits_to_keep=1)
        L0 = cache.lengths()
        blk = torch.full((1, block), model.config.mask_token_id, dtype=torch.long, device=device)
        blk[:, 0] = ids[:, -1]
        one = ids[:, -1:]

        def ar_step():
            model.causal_pass(one, cache, logits_to_keep=1)
            cache.crop(L0)

        def kv_write():  # the full block's logits, as verify reads them
            model.causal_pass(blk, cache)
            cache.crop(L0)

        def block_pass():
            model.block_pass(blk, cache)

        res = {}
        for name, fn in (("ar_step", ar_step), ("kv_write_block", kv_write), ("block_pass", block_pass)):
            for _ in range(args.warmup + 1):
                fn()
            res[name] = C.median([C.timed(fn, device)[0] for _ in range(max(args.repeats, 5))])
        crops = []  # a KV-write (untimed), then the crop that drops it (timed)
        for _ in range(max(args.repeats, 5)):
            model.causal_pass(blk, cache, logits_to_keep=1)
            crops.append(C.timed(lambda: cache.crop(L0), device)[0])
        res["crop"] = C.median(crops)
        assert int(cache.lengths()[0]) == int(L0[0])
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    import torch

    from nld_train.dist import capabilities
    from nld_train.errors import InputError
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or capabilities().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    try:
        model, tok = load(args, device, dtype)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    block = args.block_length or model.config.block_size
    if "diffusion" in args.modes and args.max_new_tokens % block:
        print(f"error: --max-new-tokens {args.max_new_tokens} must be a multiple of the block length {block} "
              "(block diffusion decodes whole blocks)", file=sys.stderr)
        return 2
    env = C.environment(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(C.env_line(env) + f"  dtype={str(dtype).replace('torch.', '')}", flush=True)
    print(f"model: {args.checkpoint or 'random weights, tiny shape (TPF meaningless)'} ({n_params / 1e6:.1f}M "
          f"params); {args.max_new_tokens} new tokens, block {block}, diffusion threshold {args.threshold}, "
          f"greedy; median of {args.repeats}", flush=True)
    results = []
    head = ("batch", "mode", "tokens/s", "x AR", "TPF", "NFE", "tok/draft", "text == AR")
    for b in args.batch_sizes:
        rows = bench_modes(args, model, tok, b, block, device)
        results += rows
        print(C.table(head, [(r["batch"], r["mode"], f"{r['tokens_per_s']:.1f}", C.fmt(r["speed_vs_ar"], ".2f"),
                              f"{r['tpf']:.2f}", r["nfe"], f"{r['tokens_per_draft']:.2f}",
                              "-" if r["same_as_ar"] is None else f"{r['same_as_ar']}/{b}") for r in rows]),
              flush=True)
    costs = forward_costs(args, model, tok, block, device)
    ar = costs["ar_step"]
    print(f"forward kinds over a {args.context}-token cache (batch 1, block {block}):")
    print(C.table(("pass", "ms", "x AR step"),
                  [(name, f"{1e3 * t:.3f}", f"{t / ar:.2f}") for name, t in costs.items()]), flush=True)
    bad = [r for r in results if get_mode(r["mode"]).equals_ar and r["same_as_ar"] is not None
           and r["same_as_ar"] != r["batch"]]
    C.write_json(args.json, {"bench": "decode", "env": env, "argv": sys.argv[1:], "checkpoint": args.checkpoint,
                             "params": n_params, "block_length": block, "results": results, "forward_costs_s": costs})
    if bad:
        what = ", ".join(f"{r['mode']} at batch {r['batch']}" for r in bad)
        if dtype in (torch.float32, torch.float64):
            print(f"error: greedy self-speculation differs from AR: {what}", file=sys.stderr)
            return 1
        # in half precision a batched verify and single-token AR steps round differently, so a
        # near-tie argmax may flip: not a decoding bug (the invariant is tested in float64)
        print(f"warning: greedy self-speculation differs from AR in {str(dtype)[6:]} ({what}); "
              "check with --dtype float32", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
