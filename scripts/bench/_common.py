"""Helpers shared by the benchmark scripts in this folder (timing, environment line, tables, JSON)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def setup_env() -> None:
    """Offline, quiet defaults (as the tests use); call before importing nld_train."""
    for k, v in dict(WANDB_MODE="disabled", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
                     HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
        os.environ.setdefault(k, v)
    import warnings
    warnings.filterwarnings("ignore", message=r".*(flex_attention called without torch.compile|"
                            r"Transformer Engine|Apex|full scope is deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint's ShardedTensor


def positive_int(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_trainer_bench_args(p, argv):
    """The tail every trainer benchmark shares: ``--json``, nld-train ``key=value`` overrides, and
    the checks of both (and of ``--warmup`` where the script has it)."""
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="nld-train overrides, e.g. model.num_layers=16")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    if getattr(args, "warmup", 0) < 0:
        p.error("--warmup must be >= 0")
    return args


def sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds of one call of ``fn`` (device synchronised before and after) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def environment(device: str) -> dict:
    import torch

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
           "torch": torch.__version__, "megatron-core": version("megatron-core"),
           "transformer-engine": version("transformer-engine") or version("transformer_engine"),
           "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
    return env


def env_line(env: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in env.items() if v is not None)


def table(head, rows) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows + [tuple(head)]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_json(path, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)
