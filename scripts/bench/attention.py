"""Attention backends for the joint [noisy ; clean] mask: time and numerical agreement.

    python scripts/bench/attention.py [--seq-length 256 512 1024] [--block-size 32 64]

For each L (the joint layout has 2L tokens) and diffusion block size, every backend computes the
same joint attention through ``nld_train.model.attention`` (the training code path):

  sdpa   masked ``scaled_dot_product_attention`` as training runs it: the clean half with the
         causal kernel, the noisy half with its [L, 2L] mask rows (the CPU training path)
  dense  one SDPA call with the whole [2L, 2L] boolean mask (the baseline for the speed-ups)
  flex   FlexAttention with a BlockMask that skips fully masked tiles; compiled on CUDA (as in
         training), eager on CPU unless --compile-flex. FlexAttention has no backward on CPU.
         Every case starts from a fresh dynamo cache (torch._dynamo.reset): the default CUDA sweep
         needs 16 graphs, twice dynamo's recompile limit, past which flex would silently run
         unfused. If flex ever falls back to eager on CUDA the script stops with an error.
  te     Transformer Engine DotProductAttention with an arbitrary mask (CUDA with TE only). TE runs
         an arbitrary mask only on its unfused backend, which materialises the [b, h, S, S]
         scores and probabilities: the row is labelled so, and skipped where its estimated memory
         does not fit the free device memory.

A case that runs out of memory is reported as such and the sweep goes on. The JSON file is
rewritten after every case ("complete": false until the end).

--mask-build-length L (default 8192 on CUDA): the packed-SFT BlockMask (joint layout, --batch
rows of random documents) is built once per micro-batch in training; its build time, uncompiled
and compiled (as training builds it on CUDA), per micro-batch.

Reported: forward and forward+backward median times (all cases timed round-robin), speed-up over the dense call, the fraction of
tiles the block mask computes, and the largest deviation of outputs and gradients from a
high-precision dense reference (float64 on CPU, float32 on CUDA). A backend that disagrees makes
the script exit with status 1. The reference row "causal(L)" is SDPA's causal kernel over L tokens:
the attention of an AR step, for the joint / AR attention ratio. The last line names the backend
that ``model.attention_backend=auto`` picks on this device (``select_backend``).
"""
from __future__ import annotations

import argparse
import functools
import sys

import _common as C

BACKENDS = ("dense", "sdpa", "flex", "te")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--seq-length", type=C.positive_int, nargs="+", default=None,
                   help="L values (default: 256 512 1024 on CPU, 1024 2048 4096 8192 on CUDA)")
    p.add_argument("--block-size", type=C.positive_int, nargs="+", default=[32, 64],
                   help="diffusion block sizes (default: 32 64)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="backends to run (default: every one available on this device)")
    p.add_argument("--batch", type=C.positive_int, default=1, help="batch size (1)")
    p.add_argument("--heads", type=C.positive_int, default=8, help="query heads (8; a 1B-8B model: 32)")
    p.add_argument("--groups", type=C.positive_int, default=4, help="key/value heads, GQA (4; 8B: 8)")
    p.add_argument("--head-dim", type=C.positive_int, default=64, help="head dimension (64; 8B: 128)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--forward-only", action="store_true", help="skip the backward timing")
    p.add_argument("--compile-flex", action="store_true",
                   help="on CPU, also time torch.compile'd FlexAttention (compiles per shape: slow start)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case (1)")
    p.add_argument("--repeats", type=C.positive_int, default=3, help="timed calls per case; median (3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=C.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--mask-build-length", type=int, default=None,
                   help="L of the packed BlockMask build timing (default: 8192 on CUDA, 0 = none on CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.heads % args.groups:
        p.error(f"--groups {args.groups} must divide --heads {args.heads}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def tile_fraction(block_mask) -> float:
    """Fraction of the (query tile, key tile) pairs a BlockMask computes (partial + full tiles)."""
    kv = block_mask.kv_num_blocks
    full = block_mask.full_kv_num_blocks
    n_q, n_kv = kv.shape[-1], block_mask.kv_indices.shape[-1]
    computed = kv.sum() + (full.sum() if full is not None else 0)
    return float(computed) / (kv.shape[0] * kv.shape[1] * n_q * n_kv)


TE_LABEL = "te (arbitrary mask: unfused, O(S^2) memory)"


def te_unfused_bytes(batch, heads, S, dtype_bytes) -> int:
    """Peak bytes of TE's UnfusedDotProductAttention forward+backward, estimated: it keeps the
    [b*h, S, S] scores and the softmax probabilities (saved for backward) in the input dtype, and
    the backward adds their two gradients; plus the boolean [S, S] mask."""
    return 4 * batch * heads * S * S * dtype_bytes + S * S


def te_attention(heads, groups, head_dim, dense_allowed):
    """Transformer Engine's DotProductAttention on the joint mask ([b, h, s, d] in and out). With
    ``attn_mask_type="arbitrary"`` TE's backend selection disables flash and fused attention
    (transformer_engine/pytorch/attention/dot_product_attention/utils.py: get_attention_backend),
    leaving UnfusedDotProductAttention."""
    import transformer_engine.pytorch as te
    mod = te.DotProductAttention(heads, head_dim, num_gqa_groups=groups, attention_dropout=0.0,
                                 qkv_format="bshd", attn_mask_type="arbitrary")
    masked_out = ~dense_allowed[None, None]  # TE: True = masked out

    def run(q, k, v):
        o = mod(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask=masked_out)
        return o.view(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
    return run


def _oom_error():
    import torch
    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _release(device) -> None:
    """Give back what an out-of-memory case left behind, so that the next case starts clean."""
    import gc

    import torch
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def bench_case(args, L, bs, backends, device, dtype):
    import torch
    import torch.nn.functional as F

    from nld_train.model.attention import attend, build_attention_inputs
    from nld_train.objective.masks import joint_attention_mask

    # One fresh recompile budget per case: the flex graphs of earlier cases (one per shape and grad
    # mode) would otherwise push this one past torch._dynamo.config.recompile_limit.
    torch._dynamo.reset()
    OOM = _oom_error()
    S, b, h, g, d = 2 * L, args.batch, args.heads, args.groups, args.head_dim
    gen = torch.Generator(device="cpu").manual_seed(L * 1000 + bs)
    q0, k0, v0, dout = (torch.randn(shape, generator=gen) for shape in
                        ((b, h, S, d), (b, g, S, d), (b, g, S, d), (b, h, S, d)))
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    dense = joint_attention_mask(L, bs, device=device)
    on_cuda = device.startswith("cuda")

    def grads_of(fn, dt, backward):
        q, k, v = (t.to(device, dt, copy=True).requires_grad_(backward) for t in (q0, k0, v0))
        out = fn(q, k, v)
        if not backward:
            return out.detach(), None
        out.backward(dout.to(device, dt))
        return out.detach(), (q.grad, k.grad, v.grad)

    def dense_call(q, k, v):  # the reference: one SDPA call over the predicate's full mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4

    def err(x, ref):  # max abs error relative to the reference's scale
        return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12))

    rows = []
    cases = []  # (label, fn, has_backward, tile fraction, status: None = run it, else why not)
    for name in backends:
        if name == "dense":
            cases.append(("dense", dense_call, True, None, None))
        elif name == "sdpa":
            spec = build_attention_inputs("joint", L, bs, "sdpa", device)
            cases.append(("sdpa", lambda q, k, v, s=spec: attend(q, k, v, s), True, None, None))
        elif name == "flex":
            spec = build_attention_inputs("joint", L, bs, "flex", device)
            frac = tile_fraction(spec.block_mask)
            label = "flex (compiled)" if on_cuda else "flex (eager)"  # as NLDCoreAttention runs it
            cases.append((label, lambda q, k, v, s=spec, c=on_cuda: attend(q, k, v, s, compiled_flex=c),
                          on_cuda, frac, None))
            if not on_cuda and args.compile_flex:
                cases.append(("flex (compiled)", lambda q, k, v, s=spec: attend(q, k, v, s, compiled_flex=True),
                              False, frac, None))
        elif name == "te":
            need = te_unfused_bytes(b, h, S, torch.finfo(dtype).bits // 8)
            free = torch.cuda.mem_get_info()[0] if on_cuda else None
            why = (None if free is None or need <= 0.9 * free else
                   f"skipped: unfused needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            cases.append((TE_LABEL, te_attention(h, g, d, dense) if why is None else None, True, None, why))
    cases.append(("causal(L) = AR attention", None, True, None, None))

    def once(fn, backward):
        q, k, v = (t.to(device, dtype, copy=True).requires_grad_(backward) for t in (q0, k0, v0))
        out = fn(q, k, v)
        if backward:  # (the causal reference has L outputs, not 2L)
            out.backward(dout[:, :, :out.shape[2]].to(device, dtype))

    def causal_ref(q, k, v):  # the AR reference: causal SDPA over L tokens (first half of the inputs)
        return F.scaled_dot_product_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], is_causal=True, enable_gqa=True)

    try:
        ref_out, ref_grads = grads_of(dense_call, ref_dtype, True)
    except OOM:
        ref_out = ref_grads = None
        _release(device)
    timings = []  # (row, key, fn, backward): timed round-robin so every case sees the same load
    for label, fn, has_bwd, frac, status in cases:
        row = {"backend": label, "seq_length": L, "block_size": bs, "fwd_s": None, "fwd_bwd_s": None,
               "tile_fraction": frac, "err_out": None, "err_grad": None, "ok": None, "tol": tol,
               "status": status or "ok"}
        rows.append(row)
        if status is not None:
            continue
        if label.startswith("causal"):
            fn = causal_ref
        elif ref_out is None:
            row["status"] = "skipped: the dense reference ran out of memory"
            continue
        else:
            try:
                out, grads = grads_of(fn, dtype, has_bwd and not args.forward_only)
            except OOM:
                row["status"] = "out of memory"
                _release(device)
                continue
            row["err_out"] = err(out, ref_out)
            row["err_grad"] = max(err(x, r) for x, r in zip(grads, ref_grads, strict=True)) if grads else None
            del out, grads
            row["ok"] = row["err_out"] <= tol and (row["err_grad"] is None or row["err_grad"] <= tol)
        row["fwd_s"] = []
        timings.append((row, "fwd_s", fn, False))
        if has_bwd and not args.forward_only:
            row["fwd_bwd_s"] = []
            timings.append((row, "fwd_bwd_s", fn, True))
    del ref_out, ref_grads
    for r in range(args.warmup + args.repeats):
        for row, key, fn, backward in timings:
            if row["status"] != "ok":
                continue
            try:
                dt = C.timed(functools.partial(once, fn, backward), device)[0]
            except OOM:
                row["status"] = f"out of memory ({'fwd+bwd' if backward else 'fwd'} timing)"
                _release(device)
                continue
            if r >= args.warmup:
                row[key].append(dt)
    for row in rows:
        for key in ("fwd_s", "fwd_bwd_s"):
            if row["status"] != "ok":
                row[key] = None
            elif row[key] is not None:
                row[key + "_all"], row[key] = row[key], C.median(row[key])
    base = next((r for r in rows if r["backend"] == "dense" and r["fwd_s"]), None)
    for r in rows:
        r["fwd_speedup_vs_dense"] = base["fwd_s"] / r["fwd_s"] if base and r["fwd_s"] else None
        r["fwd_bwd_speedup_vs_dense"] = (base["fwd_bwd_s"] / r["fwd_bwd_s"]
                                        if base and base["fwd_bwd_s"] and r["fwd_bwd_s"] else None)
    return rows


def mask_build(args, L, bs, device):
    """Build time of the packed-SFT joint BlockMask per micro-batch (``--batch`` rows of random
    documents, a fresh set per build as in training), uncompiled and compiled (inductor, as
    training builds it on CUDA; on CPU only with --compile-flex)."""
    import torch

    from nld_train.model.attention import build_packed_attention_inputs
    torch._dynamo.reset()
    OOM = _oom_error()
    gen = torch.Generator(device="cpu").manual_seed(L)

    def documents():  # ~L/512 documents per row, ids ascending as the packer writes them
        return torch.cumsum(torch.rand(args.batch, L, generator=gen) < 1 / 512, dim=1).to(device)

    variants = [("uncompiled", None)]
    if device.startswith("cuda") or args.compile_flex:
        variants.append(("compiled", "inductor"))
    rows, masks = [], {}
    probe = documents()
    for label, backend in variants:
        row = {"seq_length": L, "block_size": bs, "batch": args.batch, "builder": label, "status": "ok",
               "first_s": None, "build_s": None, "agrees": None}
        rows.append(row)

        def build(docs):
            return build_packed_attention_inputs("joint", docs, bs, "flex", compile_mask=backend).block_mask  # noqa: B023 (called within this loop iteration)
        try:
            row["first_s"], masks[label] = C.timed(lambda: build(probe), device)  # compiles, if compiled
            times = []
            for _ in range(args.warmup + args.repeats):
                docs = documents()
                times.append(C.timed(functools.partial(build, docs), device)[0])
            row["build_s_all"] = times[args.warmup:]
            row["build_s"] = C.median(row["build_s_all"])
        except OOM:
            row["status"] = "out of memory"
            masks.pop(label, None)
            _release(device)
    if len(masks) == 2:
        same = torch.equal(masks["uncompiled"].to_dense(), masks["compiled"].to_dense())
        rows[1]["agrees"] = same
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_env()
    import torch

    from nld_train.dist import capabilities
    from nld_train.model.attention import select_backend
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = capabilities()
    device = args.device or caps.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    on_cuda = device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if on_cuda else torch.float32)
    available = ["dense", "sdpa", "flex"] + (["te"] if on_cuda and caps.transformer_engine else [])
    backends = args.backends or available
    missing = [b for b in backends if b not in available]
    if missing:
        print(f"error: backend(s) {missing} not available on {device} (available: {available})", file=sys.stderr)
        return 2
    lengths = args.seq_length or ([1024, 2048, 4096, 8192] if on_cuda else [256, 512, 1024])
    mask_length = args.mask_build_length if args.mask_build_length is not None else (8192 if on_cuda else 0)
    if mask_length < 0:
        print("error: --mask-build-length must be >= 0", file=sys.stderr)
        return 2
    for L in lengths + ([mask_length] if mask_length else []):
        for bs in args.block_size:
            if L % bs:
                print(f"error: --seq-length {L} is not a multiple of --block-size {bs}", file=sys.stderr)
                return 2
    env = C.environment(device)
    print(C.env_line(env) + f"  dtype={str(dtype).replace('torch.', '')}", flush=True)
    print(f"batch={args.batch} heads={args.heads} groups={args.groups} head_dim={args.head_dim}; times in ms "
          f"(median of {args.repeats}); err = max |x - ref| / max |ref| (tolerance per dtype)", flush=True)
    auto = {"causal": select_backend("causal", caps), "joint": select_backend("joint", caps)}
    results, mask_results, all_ok = [], [], True

    def save(complete):  # after every case: a sweep cut short still leaves what it measured
        C.write_json(args.json, {"bench": "attention", "env": env, "argv": sys.argv[1:] if argv is None else argv,
                                 "complete": complete, "results": results, "mask_build": mask_results,
                                 "auto": auto})
    head = ("L", "block", "backend", "fwd ms", "fwd+bwd ms", "fwd x dense", "fwd+bwd x dense", "tiles", "err out",
            "err grad", "agrees", "status")
    ms = lambda x: "-" if x is None else f"{1e3 * x:.2f}"  # noqa: E731
    x = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for L in lengths:
        for bs in args.block_size:
            rows = bench_case(args, L, bs, backends, device, dtype)
            results += rows
            all_ok &= all(r["ok"] is not False for r in rows)
            save(False)
            print(C.table(head, [(L, bs, r["backend"], ms(r["fwd_s"]), ms(r["fwd_bwd_s"]),
                                  x(r["fwd_speedup_vs_dense"]), x(r["fwd_bwd_speedup_vs_dense"]),
                                  "-" if r["tile_fraction"] is None else f"{r['tile_fraction']:.3f}",
                                  C.fmt(r["err_out"], ".1e"), C.fmt(r["err_grad"], ".1e"),
                                  {None: "-", True: "yes", False: "NO"}[r["ok"]], r["status"]) for r in rows]),
                  flush=True)
    if mask_length:
        bs = args.block_size[0]
        mask_results += mask_build(args, mask_length, bs, device)
        all_ok &= all(r["agrees"] is not False for r in mask_results)
        save(False)
        print(f"packed joint BlockMask build per micro-batch (L={mask_length}, block {bs}, batch {args.batch}):")
        print(C.table(("builder", "first call ms", "build ms", "agrees", "status"),
                      [(r["builder"], ms(r["first_s"]), ms(r["build_s"]),
                        {None: "-", True: "yes", False: "NO"}[r["agrees"]], r["status"]) for r in mask_results]),
              flush=True)
    print(f"auto backend on {device}: causal -> {auto['causal']}, joint -> {auto['joint']}")
    save(True)
    if not all_ok:
        print("error: a backend disagrees with the dense reference (agrees = NO)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
