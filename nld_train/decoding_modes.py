"""The decoding modes by name: the one list that ``nld-generate``, ``nld-eval``, the eval report, the
HF remote code and ``scripts/bench/decode.py`` read (docs/architecture.md, "Adding a decoding mode").

A mode is a :class:`DecodingMode`: the decoder method that runs it, which of the shared settings it
takes (block length, confidence threshold, draft threshold) and under which argument name, whether
evaluations sweep it over confidence thresholds, how it counts NFE, and its marker in the plots.
:func:`decode` turns the shared settings into one call of that method.

Standard library only: the training config validates ``eval.modes`` without importing torch, and
the HF export ships this file as it is into the remote-code folder (next to ``hf_wrapper.py``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple, Union

# the settings every caller has, by the name a mode's ``kwargs`` refers to them
SETTINGS = ("block_length", "threshold", "draft_threshold")


@dataclass(frozen=True)
class DecodingMode:
    name: str
    # the decoder's method name (``getattr(decoder, method)``), or a function
    # ``fn(decoder, input_ids, max_new_tokens, **kw) -> (out_ids, nfe)`` that leaves its
    # DecodeStats in ``decoder.last_stats``
    method: Union[str, Callable]
    nfe: str                                   # how NFE is counted, in words (help text, docs)
    # method argument -> shared setting it takes (SETTINGS); the settings a mode does not list are
    # not passed to it
    kwargs: Dict[str, str] = field(default_factory=dict)
    # one evaluation / table row per confidence threshold, keyed "<name>@<threshold>"
    sweep_thresholds: bool = False
    # greedy output equals AR's token for token (the benchmarks and the demo table check it)
    equals_ar: bool = False
    marker: Tuple[str, str] = ("o", "tab:gray")   # matplotlib marker and colour in the eval plots

    def __post_init__(self):
        bad = sorted(set(self.kwargs.values()) - set(SETTINGS))
        if bad:
            raise ValueError(f"decoding mode {self.name!r}: unknown settings {bad} (known: {', '.join(SETTINGS)})")
        if not self.name.isidentifier() or self.name == "all":
            raise ValueError(f"decoding mode name {self.name!r}: must be an identifier other than 'all'")


_MODES: Dict[str, DecodingMode] = {}


def register_mode(mode: DecodingMode, replace: bool = False) -> DecodingMode:
    """Add ``mode`` (in run order: after the modes registered before it)."""
    if mode.name in _MODES and not replace:
        raise ValueError(f"decoding mode {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    return mode


def unregister_mode(name: str) -> None:
    del _MODES[name]


def mode_names() -> Tuple[str, ...]:
    """Registered mode names in run order."""
    return tuple(_MODES)


def get_mode(name: str) -> DecodingMode:
    if name not in _MODES:
        raise ValueError(f"mode={name!r} is not one of {', '.join(_MODES)}")
    return _MODES[name]


def method_names() -> Tuple[str, ...]:
    """The decoder methods of the modes given by method name (the HF wrapper exposes them)."""
    return tuple(m.method for m in _MODES.values() if isinstance(m.method, str))


def mode_keys(modes, thresholds) -> list:
    """Result keys in run order: a swept mode once per threshold ('diffusion@0.9', ...), others once."""
    keys = []
    for name in modes:
        keys += [f"{name}@{t:g}" for t in thresholds] if get_mode(name).sweep_thresholds else [name]
    return keys


def decode(decoder, mode: str, input_ids, max_new_tokens: int, block_length: int = 32, threshold: float = 0.9,
           draft_threshold: float = 0.0, **kw):
    """One call of ``mode``; returns (out_ids, nfe) and leaves the stats in ``decoder.last_stats``.
    ``threshold``: the confidence threshold (block diffusion); ``draft_threshold``: the drafting
    threshold of self-speculation (0: the whole draft block in one pass). ``kw`` (attention_mask,
    temperature, ...) goes to the method as is."""
    m = get_mode(mode)
    settings = dict(block_length=block_length, threshold=threshold, draft_threshold=draft_threshold)
    args = {arg: settings[s] for arg, s in m.kwargs.items()}
    clash = sorted(set(args) & set(kw))
    if clash:
        raise ValueError(f"mode={mode}: {clash[0]} is set from the shared settings, not passed through")
    fn = getattr(decoder, m.method) if isinstance(m.method, str) else functools.partial(m.method, decoder)
    return fn(input_ids, max_new_tokens, **args, **kw)


# -- the four modes of docs/decoding.md (spec §3.1, §3.2, §3.4, §3.5) ------------------------------
register_mode(DecodingMode(
    "ar", "ar_generate", nfe="forward passes, the prefill being the first (n tokens = n passes)",
    equals_ar=True, marker=("s", "black")))
register_mode(DecodingMode(
    "diffusion", "generate", nfe="denoise passes + one KV-write pass per block (prefill not counted)",
    kwargs={"block_length": "block_length", "threshold": "threshold"}, sweep_thresholds=True,
    marker=("o", "tab:blue")))
register_mode(DecodingMode(
    "linear_spec", "linear_spec_generate", nfe="prefill + draft passes + verify passes",
    kwargs={"block_length": "block_length", "threshold": "draft_threshold"}, equals_ar=True,
    marker=("^", "tab:green")))
register_mode(DecodingMode(
    "quadratic_spec", "quadratic_spec_generate", nfe="the fused prefill + first draft pass, then one pass per cycle",
    kwargs={"block_length": "block_length"}, equals_ar=True, marker=("D", "tab:red")))
