"""The GPU acceptance run: every CUDA-only path of nld-train checked in one go, in a few minutes.

    python scripts/gpu_acceptance.py --out DIR [--budget-s 450]     # on one H100 / H200
    python scripts/gpu_acceptance.py --cpu --out DIR                 # the parts that need no CUDA (CI)

Normally started by scripts/gpu_acceptance.sh, which first installs the wheels that
scripts/gpu_wheels.sh prepared (docs/performance.md: "GPU acceptance run"). Parts, in order:

  env                  versions, GPU, Transformer Engine; nld_train and megatron-core import
  layouts_bf16         bf16 (autocast, as training runs) forward + backward of the causal, joint and
                       packed (joint and causal) layouts with the device's attention backends,
                       against an fp32 model over one dense SDPA mask: logits and every gradient
                       [CPU: fp32, the CPU backends against the dense call]
  flex_vs_dense        compiled FlexAttention against one dense fp32 SDPA call at L = 1024 and 4096,
                       32 heads / 8 groups / dim 128, bf16: without grad, and with grad (outputs and
                       input gradients)  [CPU: eager flex forward at L = 64]
  trainer              5 steps (joint; L = 512 on CUDA, 64 on CPU) with validation every 2 steps,
                       async saves every 2 steps, full recomputation, a final sync save; then the
                       same 5 steps without recomputation, interrupted after step 3 (sync save) and
                       resumed: every step's loss equal to the first run's (CPU: to 1e-6; CUDA bf16:
                       1e-2)
  cpu_checkpoint_on_cuda   a checkpoint written by a CPU process (CUDA_VISIBLE_DEVICES="") resumed
                       on CUDA: the next step's loss equals the CPU continuation's (fp32, 1e-3)  [CUDA]
  decode_bf16          the trainer's checkpoint (load_model) in bf16 and fp32 over 2048 positions,
                       queries and keys scaled to make attention position-sharp: the bf16 logit
                       error at positions 1920-2047 at most 5e-2 and 3x the one at 0-127 (RoPE
                       angles in fp32); greedy AR tokens compared (reported)
  cuda_tests           pytest -m cuda  [CUDA]
  attention_bench      scripts/bench/attention.py at L = 4096 (flex / dense) + packed BlockMask build
                       at L = 8192  [CPU: L = 64]
  train_step_bench     scripts/bench/train_step.py, ~1.1B shape, L = 4096: MFU, joint / AR step
                       [CPU: micro model, L = 32]
  decode_bench         scripts/bench/decode.py at batch 1: tokens/s per mode, cost per forward kind
  te                   Transformer Engine checks: "skipped: no TE" without it (the stock image)

Each part's result is written as it finishes (results.json, results.md in --out, and every part's
output in log.txt). Past --budget-s the remaining parts are skipped (reported as such). Exit status:
0 when every part that ran passed, 1 when a check failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"


class Skip(Exception):
    """The part does not apply here (the message says why); not a failure."""


class Failed(Exception):
    """A check failed (the message says which and by how much)."""


class Run:
    def __init__(self, args):
        self.args, self.cpu = args, args.cpu
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.txt"
        self.log_path.write_text("")
        self.work = Path(tempfile.mkdtemp(prefix="nld-acceptance-"))
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.results = []
        self.state = {}  # what one part leaves for a later one (the trainer's run dir)

    # -- output ---------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def left(self) -> float:
        return self.deadline - time.time()

    def write(self, env=None) -> None:
        if env is not None:
            self.env = env
        payload = {"mode": "cpu" if self.cpu else "cuda", "budget_s": self.args.budget_s,
                   "elapsed_s": round(time.time() - self.t0, 1), "env": getattr(self, "env", None),
                   "parts": self.results}
        (self.out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        lines = [f"# nld-train GPU acceptance ({payload['mode']} mode)", "",
                 f"elapsed {payload['elapsed_s']} s of {self.args.budget_s} s; "
                 + "; ".join(f"{k}={v}" for k, v in (payload["env"] or {}).items() if v is not None), "",
                 "| part | status | seconds | summary |", "|---|---|---|---|"]
        for r in self.results:
            summary = r["message"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.1f} | {summary} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")

    # -- helpers for the parts ------------------------------------------------------------------
    def child_env(self, extra=None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(extra or {})
        return env

    def subprocess(self, cmd, cap_s: float, env=None) -> str:
        """Run ``cmd`` (its output goes to log.txt) within ``cap_s`` and the time left; its stdout."""
        timeout = max(1.0, min(cap_s, self.left()))
        self.log(f"$ {' '.join(str(c) for c in cmd)}  (timeout {timeout:.0f} s)")
        with subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=self.child_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                out, _ = proc.communicate()
                self.log(out or "")
                raise Failed(f"timed out after {timeout:.0f} s: {' '.join(str(c) for c in cmd[1:4])} ...") from None
        self.log(out)
        if proc.returncode != 0:
            tail = " / ".join(ln for ln in out.strip().splitlines()[-3:])
            raise Failed(f"exit status {proc.returncode}: {tail[-400:]}")
        return out

    def bench(self, name: str, argv: list, cap_s: float) -> dict:
        """scripts/bench/<name>.py with ``--json``: a subprocess on CUDA (a clean device and a hard
        timeout), in this process on CPU (no second start-up of torch and megatron)."""
        path = self.work / f"{name}.json"
        argv = [*argv, "--json", str(path)]
        if not self.cpu:
            self.subprocess([sys.executable, BENCH / f"{name}.py", *argv], cap_s)
        else:
            import importlib.util
            if str(BENCH) not in sys.path:
                sys.path.insert(0, str(BENCH))
            spec = importlib.util.spec_from_file_location(f"nld_bench_{name}", BENCH / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = mod.main(argv)
            self.log(f"$ {name}.py {' '.join(argv)}\n{buf.getvalue()}")
            if rc != 0:
                raise Failed(f"{name}.py exit status {rc}: {buf.getvalue().strip().splitlines()[-1:]}")
        return json.loads(path.read_text())


# -- the parts --------------------------------------------------------------------------------------
PARTS = []


def part(name, needs_cuda=False, cap_s=60):
    def register(fn):
        PARTS.append((name, needs_cuda, cap_s, fn))
        return fn
    return register


def _device(run):
    return "cpu" if run.cpu else "cuda"


def _rel(x, ref) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12))


@part("env")
def env_part(run):
    from importlib import metadata

    import megatron.core  # noqa: F401  (the wheel installed, importable with this torch)
    import torch

    from nld_train.dist import capabilities

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    caps = capabilities()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0],
           "torch": torch.__version__, "cuda": torch.version.cuda, "megatron-core": version("megatron-core"),
           "transformers": version("transformers"),
           "transformer-engine": version("transformer-engine") or version("transformer_engine"),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "device": caps.device, "te": caps.transformer_engine}
    run.write(env)
    if not run.cpu and not torch.cuda.is_available():
        raise Failed("CUDA is not available (use --cpu for the CPU parts)")
    return ", ".join(f"{k} {v}" for k, v in env.items() if k in ("gpu", "torch", "cuda", "megatron-core")), env


def _dist():
    import torch.distributed as dist

    from nld_train.dist import init_distributed
    if not dist.is_initialized():
        init_distributed(1, seed=1234)


@part("layouts_bf16", cap_s=120)
def layouts_part(run):
    import torch
    import torch.nn.functional as F

    from nld_train.cli import load_config
    from nld_train.config import ParallelConfig
    from nld_train.model.attention import AttentionInputs
    from nld_train.model.gpt import build_model
    from nld_train.objective.masks import causal_attention_mask, joint_attention_mask, packed_attention_mask
    _dist()
    dev = _device(run)
    L, bs, b = (64, 16, 2) if run.cpu else (512, 32, 2)
    m = load_config(["recipe=smoke", f"model={'micro' if run.cpu else 'tiny'}"]).model
    model = build_model(m, ParallelConfig(), 2 * L, seed=3)
    g = torch.Generator().manual_seed(5)
    docs = torch.cumsum(torch.rand(b, L, generator=g) < 4 / L, 1).to(dev)  # a few documents per row
    ids = {n: torch.randint(2, m.vocab_size, (b, n), generator=g).to(dev) for n in (L, 2 * L)}
    pos = {L: torch.arange(L, device=dev).expand(b, -1), 2 * L: torch.arange(L, device=dev).repeat(2).expand(b, -1)}
    tests = {  # layout: (tokens, the device's attention inputs, the dense fp32 reference's)
        "causal": (L, model.attention_inputs("causal", L, bs, dev),
                   AttentionInputs("causal", dense=causal_attention_mask(L, device=dev))),
        "joint": (2 * L, model.attention_inputs("joint", L, bs, dev),
                  AttentionInputs("joint", dense=joint_attention_mask(L, bs, device=dev))),
        "packed_joint": (2 * L, model.packed_attention_inputs("joint", docs, pos[2 * L], bs),
                         AttentionInputs("joint", dense=packed_attention_mask("joint", docs, bs)[:, None])),
        "packed_causal": (L, model.packed_attention_inputs("causal", docs, pos[L], bs),
                          AttentionInputs("causal", dense=packed_attention_mask("causal", docs, bs)[:, None])),
    }
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(n, spec, bf16):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model.full_logits(ids[n], pos[n], spec)
        targets = torch.roll(ids[n], -1, 1)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        return logits.detach().float(), [p.grad.detach().clone() for p in params]

    details, bad = {}, []
    # CPU: fp32 (megatron's linear layers have no CPU autocast, and CPU training runs fp32), which
    # still checks the device's backends (split SDPA, packed masks) against the one dense call
    bf16, tol = (False, 1e-4) if run.cpu else (True, 5e-2)
    for name, (n, spec, ref_spec) in tests.items():
        ref_logits, ref_grads = forward_backward(n, ref_spec, False)
        logits, grads = forward_backward(n, spec, bf16)
        e_logits = _rel(logits, ref_logits)
        # all gradients as one vector (a single tiny gradient, e.g. of a norm weight, is noise in bf16)
        diff = torch.cat([(a - r).flatten() for a, r in zip(grads, ref_grads, strict=True)])
        e_grad = float(diff.norm() / torch.cat([r.flatten() for r in ref_grads]).norm().clamp(min=1e-12))
        worst = max(float((a - r).norm() / r.norm().clamp(min=1e-12)) for a, r in zip(grads, ref_grads, strict=True))
        backend = "flex" if spec.block_mask is not None else "sdpa"
        details[name] = {"backend": backend, "err_logits": e_logits, "err_grad": e_grad,
                         "err_grad_worst_parameter": worst}
        if not (e_logits <= tol and e_grad <= tol):
            bad.append(f"{name}: logits {e_logits:.1e}, grad {e_grad:.1e}")
    msg = "; ".join(f"{k} ({v['backend']}) logits {v['err_logits']:.1e} grads {v['err_grad']:.1e}"
                    for k, v in details.items())
    what = "bf16" if bf16 else "fp32"
    if bad:
        raise Failed(f"{what} vs fp32 dense beyond {tol:g}: {'; '.join(bad)} | {msg}")
    return msg + f" ({what}, L={L}; logits: max rel err, grads: rel norm err of all; limit {tol:g})", details


@part("flex_vs_dense", cap_s=120)
def flex_part(run):
    import torch
    import torch.nn.functional as F

    from nld_train.model.attention import attend, build_attention_inputs
    from nld_train.objective.masks import joint_attention_mask
    dev = _device(run)
    torch._dynamo.reset()
    lengths, (h, grp, d) = ([64], (8, 4, 64)) if run.cpu else ([1024, 4096], (32, 8, 128))
    details, bad = {}, []
    for L in lengths:
        torch._dynamo.reset()  # two graphs per length (with and without grad): a fresh budget each
        S = 2 * L
        g = torch.Generator().manual_seed(L)
        q0, k0, v0, dout = (torch.randn(s, generator=g) for s in ((1, h, S, d), (1, grp, S, d), (1, grp, S, d),
                                                                   (1, h, S, d)))
        mask = joint_attention_mask(L, 32, device=dev)
        spec = build_attention_inputs("joint", L, 32, "flex", dev)

        def run_fn(fn, dt, grad):
            q, k, v = (t.to(dev, dt).requires_grad_(grad) for t in (q0, k0, v0))  # noqa: B023 (called within this loop iteration)
            out = fn(q, k, v)
            if not grad:
                return out.detach(), None
            out.backward(dout.to(dev, dt))  # noqa: B023 (called within this loop iteration)
            return out.detach(), (q.grad, k.grad, v.grad)

        def dense(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: B023 (called within this loop iteration)
        ref, ref_grads = run_fn(dense, torch.float32, not run.cpu)
        flex = lambda q, k, v: attend(q, k, v, spec, compiled_flex=not run.cpu)  # noqa: B023,E731
        dt = torch.float32 if run.cpu else torch.bfloat16
        tol = 2e-4 if run.cpu else 2e-2
        with torch.no_grad():
            out_ng, _ = run_fn(flex, dt, False)
        row = {"err_out_no_grad": _rel(out_ng, ref)}
        if not run.cpu:  # FlexAttention has no backward on CPU
            out, grads = run_fn(flex, dt, True)
            row["err_out_grad"] = _rel(out, ref)
            row["err_grad"] = max(_rel(a, r) for a, r in zip(grads, ref_grads, strict=True))
        details[L] = row
        if any(v > tol for v in row.values()):
            bad.append(f"L={L}: " + ", ".join(f"{k} {v:.1e}" for k, v in row.items()))
    msg = "; ".join(f"L={L}: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()) for L, r in details.items())
    if bad:
        raise Failed(f"flex vs dense beyond tolerance: {'; '.join(bad)}")
    return msg + (" (eager flex, forward only on CPU)" if run.cpu else " (compiled, bf16; limit 2e-2)"), details


def _trainer_overrides(model, L, eval_interval=2):
    return ["recipe=smoke", f"model={model}", f"train.seq_length={L}", "objective.block_size=16",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr_schedule_steps=5",
            f"train.eval_interval={eval_interval}", "train.eval_iters=1", "checkpoint.keep_last=3",
            "wandb.mode=disabled", "train.log_interval=1"]


def _train(overrides):
    from nld_train.cli import load_config
    from nld_train.train.trainer import Trainer
    trainer = Trainer(load_config(overrides, world_size=1))
    resumed_at = trainer.step if trainer.resumed else None
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer, resumed_at


def _losses(run_dir) -> dict:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r for r in rows}


@part("trainer", cap_s=150)
def trainer_part(run):
    import torch

    from nld_train import checkpoint as ckpt
    _dist()
    L = 64 if run.cpu else 512
    base = _trainer_overrides("micro" if run.cpu else "tiny", L)
    a_dir, b_dir = run.work / "train_a", run.work / "train_b"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _train([*base, f"run.dir={a_dir}", "train.max_steps=5", "checkpoint.interval=2",
                "checkpoint.async_save=true", "parallel.recompute=full"])
        _train([*base, f"run.dir={b_dir}", "train.max_steps=3"])  # final save, synchronous
        _, resumed_at = _train([*base, f"run.dir={b_dir}", "train.max_steps=5"])
    run.log(buf.getvalue())
    a, b = _losses(a_dir), _losses(b_dir)
    problems = []
    if sorted(a) != [1, 2, 3, 4, 5] or sorted(b) != [1, 2, 3, 4, 5]:
        problems.append(f"steps logged: {sorted(a)} and {sorted(b)}")
    if resumed_at != 3:
        problems.append(f"the second run resumed at {resumed_at}, not 3")
    if ckpt.complete_steps(a_dir) != [2, 4, 5]:
        problems.append(f"checkpoints of the async run: {ckpt.complete_steps(a_dir)} (want [2, 4, 5])")
    val = [s for s in sorted(a) if "val_loss" in a[s]]
    if val != [2, 4]:
        problems.append(f"validation at steps {val} (want [2, 4])")
    losses = {s: (a[s]["loss"], b[s]["loss"]) for s in sorted(set(a) & set(b))}
    if not all(torch.isfinite(torch.tensor(x)).all() for x in losses.values()):
        problems.append(f"non-finite losses {losses}")
    tol = 1e-6 if run.cpu else 1e-2
    diff = max((abs(x - y) / abs(y) for x, y in losses.values()), default=float("inf"))
    if diff > tol:
        problems.append(f"recomputed+async run vs interrupted+resumed run: losses differ by {diff:.2e} "
                        f"(rel; limit {tol:g}): {losses}")
    run.state["trainer_run"] = a_dir
    details = {"losses": losses, "max_rel_loss_diff": diff, "resumed_at": resumed_at,
               "checkpoints": ckpt.complete_steps(a_dir), "val_steps": val,
               "step_time_s": [a[s]["step_time_s"] for s in sorted(a)]}
    if problems:
        raise Failed("; ".join(problems))
    return (f"L={L}: 5 steps, val at {val}, async saves + recompute; resumed at 3: losses equal to "
            f"{diff:.1e} (limit {tol:g}); step 5 loss {a[5]['loss']:.4f}"), details


@part("cpu_checkpoint_on_cuda", needs_cuda=True, cap_s=120)
def cpu_checkpoint_part(run):
    """A CPU process trains 2 steps and saves; the checkpoint resumes on CUDA for step 3 and on CPU
    (a copy) for step 3: the same loss (fp32 both, so that only the device differs)."""
    c_dir, d_dir = run.work / "cpu_ckpt", run.work / "cpu_ckpt_copy"
    base = _trainer_overrides("micro", 64, eval_interval=0) + ["train.precision=fp32"]
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    run.subprocess([sys.executable, "-m", "nld_train.cli", *base, f"run.dir={c_dir}", "train.max_steps=2"], 90, cpu)
    shutil.copytree(c_dir, d_dir)
    run.subprocess([sys.executable, "-m", "nld_train.cli", *base, f"run.dir={d_dir}", "train.max_steps=3"], 90, cpu)
    _dist()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        trainer, resumed_at = _train([*base, f"run.dir={c_dir}", "train.max_steps=3"])
    run.log(buf.getvalue())
    if trainer.device.type != "cuda":
        raise Failed(f"the resumed trainer ran on {trainer.device}, not CUDA")
    on_cuda, on_cpu = _losses(c_dir)[3]["loss"], _losses(d_dir)[3]["loss"]
    diff = abs(on_cuda - on_cpu) / abs(on_cpu)
    details = {"resumed_at": resumed_at, "loss_step3_cuda": on_cuda, "loss_step3_cpu": on_cpu, "rel_diff": diff}
    if resumed_at != 2 or diff > 1e-3:
        raise Failed(f"resumed at {resumed_at} (want 2); step-3 loss CUDA {on_cuda:.6f} vs CPU {on_cpu:.6f} "
                     f"(rel {diff:.1e}, limit 1e-3)")
    return f"resumed at step 2 on CUDA; step-3 loss {on_cuda:.5f} vs CPU {on_cpu:.5f} (rel {diff:.1e})", details


@part("decode_bf16", cap_s=90)
def decode_part(run):
    import torch

    from nld_train.inference import load_model
    src = run.state.get("trainer_run")
    if src is None:
        raise Skip("no checkpoint: the trainer part did not complete")
    dev = _device(run)
    models = {dt: load_model(src, device=dev, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    # A 5-step model attends almost uniformly, so position errors barely reach its logits. Queries
    # and keys scaled (the same in both copies; scores ~ scale^2 x hidden) make attention
    # position-sharp, as in a trained model: then angles formed in bf16 show (positions near 2000
    # are 8 apart in bf16). Measured on random micro/tiny weights: fp32 angles ~1e-2, bf16 >= 0.2.
    hidden = models[torch.float32].config.hidden_size
    scale = 8 * (64 / hidden) ** 0.5
    with torch.no_grad():
        for m in models.values():
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(scale)
                layer.self_attn.k_proj.weight.mul_(scale)
    n = 2048
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, models[torch.float32].config.vocab_size, (1, n), generator=g).to(dev)
    pos = torch.arange(n, device=dev)[None]
    with torch.no_grad():
        lg = {dt: m(ids, pos).float() for dt, m in models.items()}
    early = _rel(lg[torch.bfloat16][:, :128], lg[torch.float32][:, :128])
    late = _rel(lg[torch.bfloat16][:, -128:], lg[torch.float32][:, -128:])
    top = {dt: x[:, -128:].argmax(-1) for dt, x in lg.items()}
    agree_late = float((top[torch.bfloat16] == top[torch.float32]).float().mean())
    prompt = ids[:, :64]
    gen = {dt: m.ar_generate(prompt, 32)[0][0, 64:].tolist() for dt, m in models.items()}
    same = sum(x == y for x, y in zip(gen[torch.float32], gen[torch.bfloat16], strict=True))
    details = {"err_early": early, "err_late": late, "argmax_agree_late": agree_late,
               "greedy_same_tokens": f"{same}/32"}
    if late > 3 * early or late > 5e-2:
        raise Failed(f"bf16 logit error at positions {n - 128}-{n - 1} is {late:.1e} (limits: 5e-2 and 3x the "
                     f"{early:.1e} at 0-127): RoPE angles not formed in fp32?")
    return (f"bf16 vs fp32 logit error: positions 0-127 {early:.1e}, {n - 128}-{n - 1} {late:.1e} "
            f"(limits 5e-2, 3x early); "
            f"late argmax agreement {agree_late:.0%}; greedy AR {same}/32 tokens equal"), details


@part("cuda_tests", needs_cuda=True, cap_s=150)
def cuda_tests_part(run):
    out = run.subprocess([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "tests"],
                         150)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return last, {"summary": last}


@part("attention_bench", cap_s=120)
def attention_bench_part(run):
    if run.cpu:
        argv = ["--seq-length", "64", "--block-size", "32", "--warmup", "0", "--repeats", "1",
                "--mask-build-length", "128"]
    else:
        argv = ["--seq-length", "4096", "--block-size", "32", "--heads", "32", "--groups", "8", "--head-dim", "128",
                "--warmup", "1", "--repeats", "3", "--mask-build-length", "8192"]
    res = run.bench("attention", argv, 120)
    flex = next((r for r in res["results"] if r["backend"].startswith("flex")), None)
    mask = {r["builder"]: r["build_s"] for r in res.get("mask_build", [])}
    key = "fwd_bwd_speedup_vs_dense" if flex and flex.get("fwd_bwd_speedup_vs_dense") else "fwd_speedup_vs_dense"
    speed = flex and flex.get(key)
    msg = (f"flex {flex['backend'].split(' ')[-1].strip('()')} / dense ({key.split('_speedup')[0].replace('_', '+')}): "
           f"{speed:.2f}x" if speed else "flex: no timing")
    msg += "; packed mask build ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in mask.items() if v)
    return msg, res


@part("train_step_bench", cap_s=180)
def train_step_bench_part(run):
    if run.cpu:
        argv = ["--model", "micro", "--seq-length", "32", "--micro-batch-size", "1", "--block-size", "16",
                "--warmup", "0", "--repeats", "1"]
    else:  # ~1.1B (TinyLlama shape, untied), as docs/performance.md
        argv = ["--model", "tiny", "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "1",
                "--warmup", "2", "--repeats", "3", "model.num_layers=22", "model.hidden_size=2048",
                "model.num_attention_heads=32", "model.num_query_groups=4", "model.ffn_hidden_size=5632",
                "model.vocab_size=32000", "model.max_position_embeddings=4096"]
    res = run.bench("train_step", argv, 180)
    r = res["results"][0]
    mfu = r["ar"].get("mfu_ar_equiv")
    return (f"L={r['seq_length']}: joint / AR step {r['joint_over_ar']:.2f}; AR MFU "
            f"{'-' if mfu is None else f'{mfu:.1%}'}; AR step {r['ar']['step_s'] * 1e3:.0f} ms"), res


@part("decode_bench", cap_s=120)
def decode_bench_part(run):
    argv = ["--batch-sizes", "1", "--warmup", "1", "--repeats", "3"]
    if run.cpu:
        argv = ["--batch-sizes", "1", "--max-new-tokens", "16", "--block-length", "8", "--warmup", "0",
                "--repeats", "1", "--context", "16"]
    res = run.bench("decode", argv, 120)
    rows = [r for r in res["results"] if r["batch"] == 1]
    msg = "; ".join(f"{r['mode']} {r['tokens_per_s']:.0f} tok/s (x AR {C_fmt(r['speed_vs_ar'])}, TPF {r['tpf']:.2f})"
                    for r in rows)
    costs = res.get("forward_costs_s") or {}
    msg += "; forward ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in costs.items() if isinstance(v, (int, float)))
    return msg, res


def C_fmt(x):
    return "-" if x is None else f"{x:.2f}"


@part("te", cap_s=120)
def te_part(run):
    from nld_train.dist import capabilities
    if not capabilities().transformer_engine:
        raise Skip("no TE")
    res = run.bench("attention", ["--seq-length", "1024", "--block-size", "32", "--backends", "dense", "te",
                                  "--mask-build-length", "0"], 120)
    te = next(r for r in res["results"] if r["backend"].startswith("te"))
    return f"{te['backend']}: {te['status']}, agrees {te['ok']}", res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="results folder (results.json, results.md, log.txt)")
    p.add_argument("--cpu", action="store_true", help="only the parts that need no CUDA, at small sizes (CI)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the parts left after this many seconds (default: 450 on CUDA, 110 with --cpu)")
    p.add_argument("--parts", nargs="+", default=None, choices=[n for n, *_ in PARTS],
                   help="run only these parts (default: all)")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 110.0 if args.cpu else 450.0
    for k, v in dict(WANDB_MODE="disabled", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
                     HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1").items():
        os.environ.setdefault(k, v)
    import warnings
    warnings.filterwarnings("ignore", message=r".*(flex_attention called without torch.compile|"
                            r"Transformer Engine|Apex|full scope is deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    run = Run(args)
    # the demo corpus is tokenised once into a cache: keep it inside this run's scratch folder
    os.environ.setdefault("NLD_CACHE_DIR", str(run.work / "cache"))
    run.write()
    failed = False
    for name, needs_cuda, _cap_s, fn in PARTS:
        if args.parts and name not in args.parts:
            continue
        t0 = time.time()
        status, details = "pass", None
        if needs_cuda and run.cpu:
            status, message = "skipped", "needs CUDA"
        elif run.left() <= 0:
            status, message = "skipped", f"past the {args.budget_s:.0f} s budget"
        else:
            run.log(f"==== {name}")
            try:
                message, details = fn(run)
            except Skip as e:
                status, message = "skipped", str(e)
            except Failed as e:
                status, message = "FAIL", str(e)
            except Exception as e:  # a crash is a failed check too; the traceback goes to log.txt
                status, message = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
                run.log(traceback.format_exc())
        failed |= status == "FAIL"
        run.results.append({"part": name, "status": status, "seconds": round(time.time() - t0, 1),
                            "message": message, "details": details})
        run.write()
        print(f"[{time.time() - run.t0:6.1f} s] {name:24s} {status:8s} {message}", flush=True)
    shutil.rmtree(run.work, ignore_errors=True)
    late = sum(r["message"].startswith("past the") for r in run.results)
    print(f"results: {run.out / 'results.md'} ({'FAILED' if failed else 'all checks that ran passed'}"
          f"{f'; {late} part(s) not run: past the budget' if late else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
