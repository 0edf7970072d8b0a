"""What an evaluation runs: :class:`EvalSettings` and its validation (standard library only, so
``nld-train`` can validate ``eval.*`` with the rest of the config, before torch loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from nld_train import decoding_modes
from nld_train.errors import ConfigError

TASK_NAMES = ("gsm8k", "math500", "humaneval", "mbpp", "demo_math")
FORMATS = ("auto", "fewshot", "chat")


@dataclass
class EvalSettings:
    tasks: List[str] = field(default_factory=lambda: ["gsm8k"])
    modes: List[str] = field(default_factory=lambda: list(decoding_modes.mode_names()))
    thresholds: List[float] = field(default_factory=lambda: [0.9])   # threshold-swept modes: one result per value
    limit: Optional[int] = None             # first n samples of each task (file order)
    batch_size: int = 8
    max_new_tokens: Optional[int] = None    # None = the task's default; rounded up to a multiple of B
    block_length: Optional[int] = None      # None = the checkpoint's objective.block_size
    spec_threshold: float = 0.0             # linear self-speculation's draft threshold
    prompt_format: str = "auto"             # auto = chat if the tokenizer has a chat template
    shots: Dict[str, int] = field(default_factory=dict)   # per task, e.g. {"gsm8k": 4}
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sol: bool = True                        # SOL-oracle TPF per task
    exec_timeout: float = 20.0              # seconds per program (HumanEval, MBPP)
    exec_memory_mb: int = 1024
    # extra keyword arguments of the decode methods: {"*": {...} for every mode, "<mode>": {...}}
    decode_kwargs: Dict[str, dict] = field(default_factory=dict)
    progress: bool = True
    plots: bool = True


def mode_keys(s: EvalSettings) -> List[str]:
    """Result keys in run order: 'ar', 'diffusion@0.9', ..., 'linear_spec', 'quadratic_spec'."""
    return decoding_modes.mode_keys(s.modes, s.thresholds)


def validate_settings(s: EvalSettings, prefix: str = "") -> None:
    """ConfigError naming the key (``prefix`` + name) for impossible values."""
    def fail(key, msg):
        raise ConfigError(f"{prefix}{key}: {msg}")
    if not s.tasks:
        fail("tasks", "is empty")
    for t in s.tasks:
        if t not in TASK_NAMES:
            fail("tasks", f"unknown task {t!r} (known: {', '.join(TASK_NAMES)})")
    if len(set(s.tasks)) != len(s.tasks):
        fail("tasks", f"lists a task twice: {s.tasks}")
    known = decoding_modes.mode_names()
    if not s.modes:
        fail("modes", "is empty")
    for m in s.modes:
        if m not in known:
            fail("modes", f"unknown mode {m!r} (known: {', '.join(known)})")
    if len(set(s.modes)) != len(s.modes):
        fail("modes", f"lists a mode twice: {s.modes}")
    for m in s.modes:
        if decoding_modes.get_mode(m).sweep_thresholds and not s.thresholds:
            fail("thresholds", f"is empty but modes has {m}")
    for t in s.thresholds:
        if not isinstance(t, (int, float)) or not 0 < t <= 1:
            fail("thresholds", f"{t!r} is not in (0, 1]")
    if len({f"{t:g}" for t in s.thresholds}) != len(s.thresholds):
        fail("thresholds", f"lists a value twice: {s.thresholds}")
    if s.limit is not None and s.limit <= 0:
        fail("limit", f"must be positive, got {s.limit}")
    if s.batch_size <= 0:
        fail("batch_size", f"must be positive, got {s.batch_size}")
    if s.max_new_tokens is not None and s.max_new_tokens <= 0:
        fail("max_new_tokens", f"must be positive, got {s.max_new_tokens}")
    if s.block_length is not None and s.block_length <= 0:
        fail("block_length", f"must be positive, got {s.block_length}")
    if not 0 <= s.spec_threshold <= 1:
        fail("spec_threshold", f"must be in [0, 1], got {s.spec_threshold}")
    if s.prompt_format not in FORMATS:
        fail("prompt_format", f"{s.prompt_format!r} is not one of {', '.join(FORMATS)}")
    for t, n in s.shots.items():
        if t not in TASK_NAMES:
            fail(f"shots.{t}", f"unknown task (known: {', '.join(TASK_NAMES)})")
        if not isinstance(n, int) or n < 0:
            fail(f"shots.{t}", f"must be an integer >= 0, got {n!r}")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        fail("temperature", f"need temperature >= 0 and 0 < top_p <= 1, got {s.temperature}, {s.top_p}")
    if s.exec_timeout <= 0 or s.exec_memory_mb < 64:
        fail("exec_timeout", "exec_timeout must be positive and exec_memory_mb >= 64")
    for k, kw in s.decode_kwargs.items():
        if k != "*" and k not in known:
            fail(f"{k}.", f"decode arguments for unknown mode {k!r}")
        if not isinstance(kw, dict):
            fail(f"{k}.", "must map argument names to values")


def from_eval_config(e, **overrides) -> EvalSettings:
    """nld_train.config.EvalConfig (the training run's ``eval.*``) -> EvalSettings."""
    kw = dict(tasks=list(e.tasks), modes=list(e.modes), thresholds=[float(t) for t in e.thresholds], limit=e.limit,
              batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, prompt_format=e.prompt_format, sol=e.sol,
              progress=False, plots=False)
    kw.update(overrides)
    return EvalSettings(**kw)
