"""``nld-train recipe=<name> [group=option ...] [key=value ...]`` (Hydra compose API).

The config is composed and checked against the typed schema (:mod:`nld_train.config`) before
torch or megatron are imported, so a wrong key, a wrong type or an impossible layout fails at
once, naming the key. A recipe with a ``pipeline`` runs its stages one after another in
``run.dir/<stage>``, each initialised from the previous stage's final checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path

from nld_train.config import (
    SHAPE_KEYS,
    Config,
    ConfigError,
    model_config_from_dict,
    model_shape,
    padded_vocab_size,
    validate,
)
from nld_train.errors import InputError
from nld_train.eval.settings import TASK_NAMES, from_eval_config, validate_settings
from nld_train.eval.tasks import get_task

USAGE = """usage: nld-train recipe=<name> [group=option ...] [key=value ...]

recipes:  {recipes}
groups:   model={models}  objective={objectives}  parallel={parallels}  data={datas}
examples: nld-train recipe=demo
          nld-train recipe=smoke run.dir=runs/x train.max_steps=12 checkpoint.interval=3
          torchrun --nproc_per_node=2 -m nld_train.cli recipe=smoke parallel=tp2
          nld-train recipe=smoke train.lr=1e-3 --cfg job [--resolve] [-p train]   (print the config, run nothing)
Resuming is automatic when run.dir already holds a checkpoint. Docs: docs/recipes.md"""


def recipes_dir() -> Path:
    env = os.environ.get("NLD_RECIPES_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / "recipes"
    if not (d / "config.yaml").is_file():
        raise FileNotFoundError(f"recipes folder {d} not found (set NLD_RECIPES_DIR or install nld-train "
                                "editable from its repository: pip install -e .)")
    return d


def _options(group: str) -> str:
    return ",".join(sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml")))


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="nld_schema", node=Config)
    if not OmegaConf.has_resolver("nld_asset"):
        # the packaged demo assets (tokenizer) and the demo corpus, built on first use
        OmegaConf.register_new_resolver("nld_asset", lambda name: str(Path(__file__).parent / "assets" / name))
        OmegaConf.register_new_resolver("nld_demo_corpus", _demo_corpus)
        OmegaConf.register_new_resolver("nld_demo_math_corpus", _demo_math_corpus)


def _demo_corpus() -> str:
    from nld_train.data.demo_corpus import ensure_demo_corpus  # lazy: megatron (see pyproject.toml)
    return ensure_demo_corpus()


def _demo_math_corpus() -> str:
    from nld_train.data.demo_corpus import ensure_math_corpus  # lazy: megatron (see pyproject.toml)
    return ensure_math_corpus()


class UsageError(ValueError):
    pass


@contextlib.contextmanager
def _config_errors():
    """Hydra/OmegaConf errors -> ConfigError with the whole chain (Hydra wraps the message that
    names the key)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        msg, cause = str(e), e.__cause__
        while cause is not None:
            msg += f"\n  {cause}"
            cause = cause.__cause__
        raise ConfigError(msg) from None


def compose_config(overrides: list[str], init_source: dict | None = None):
    """The recipe with its overrides, merged into the typed schema (wrong keys and types fail
    here), the model and tokenizer taken from ``checkpoint.init_from`` (:func:`model_from_checkpoint`);
    a DictConfig, interpolations not yet resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    recipe = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if not recipe:
        raise UsageError("missing recipe=<name>; available: " + _options("recipe"))
    _register()
    with _config_errors():
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            node = compose("config", overrides=list(overrides))
        # re-merge into a fresh schema: keys appended with `+` must exist in the dataclasses too
        node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(node), {"recipe": recipe[-1]})
        model_from_checkpoint(node, overrides, init_source)
        return node


def _given_model_keys(overrides: list[str]) -> tuple[list[str], str | None]:
    """The ``model.*`` keys given on the command line (dotted, without ``model.``) and the
    ``model=<name>`` group choice, if any."""
    keys, group = [], None
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "model":
            group = value
        elif key.startswith("model."):
            keys.append(key[len("model."):])
    return keys, group


def _init_source(node) -> dict | None:
    """The checkpoint whose model and tokenizer the run takes, as its marker dict: the run dir's own
    latest checkpoint when it resumes (it was initialised from ``checkpoint.init_from``), else
    ``checkpoint.init_from``'s; None without ``init_from``."""
    from omegaconf import OmegaConf
    init_from = OmegaConf.select(node, "checkpoint.init_from")
    if not init_from:
        return None
    # lazy: torch (see pyproject.toml); only a run with checkpoint.init_from reads a marker here
    from nld_train import checkpoint as ckpt
    try:
        step = ckpt.find_latest(OmegaConf.select(node, "run.dir")) or ckpt.resolve(init_from)
        meta = dict(ckpt.read_meta(step))
        meta["config"] = ckpt.run_config(step, meta)
    except (InputError, ValueError) as e:
        raise ConfigError(f"checkpoint.init_from={init_from}: {e}") from None
    # a converted folder keeps its tokenizer next to checkpoints/: found there even if the folder moved
    beside = step.parent.parent.parent / "tokenizer"
    if step.parent.parent.name == "checkpoints" and (beside / "tokenizer_config.json").is_file():
        meta["tokenizer_path"] = str(beside)
    else:
        meta["tokenizer_path"] = (meta["config"].get("tokenizer") or {}).get("path")
    meta["source"] = str(step)
    return meta


def model_from_checkpoint(node, overrides: list[str], init_source: dict | None = None) -> None:
    """``checkpoint.init_from`` carries the model: its model config replaces the recipe's model group
    and its tokenizer becomes the default ``tokenizer.path``. Only what the command line gives is
    compared: ``model=<name>`` / ``model.<key>=`` values that change a tensor shape are refused,
    naming the key; the others (``rope_theta``, ``attention_backend``, ...) apply. A vocabulary padded
    for another TP is re-padded when the run's TP divides its multiple, else refused naming ``--tp``.
    ``init_source`` (a marker dict, see :func:`_init_source`) stands in for a checkpoint that does
    not exist yet: a pipeline's previous stage."""
    from omegaconf import OmegaConf
    src = init_source if init_source is not None else _init_source(node)
    if src is None:
        return
    where = f"checkpoint.init_from={OmegaConf.select(node, 'checkpoint.init_from')} ({src['source']})"
    saved = model_config_from_dict(src["config"]["model"])
    keys, group = _given_model_keys(overrides)
    given = OmegaConf.to_object(node.model)
    run_tp = OmegaConf.select(node, "parallel.tensor_model_parallel_size")
    if group is None:   # the checkpoint's model, with the command line's model.* values on top
        model = OmegaConf.structured(saved)
        for k in keys:
            OmegaConf.update(model, k, OmegaConf.select(node.model, k), merge=False)
        node.model = model
        given = OmegaConf.to_object(node.model)
    named = {k.split(".")[0] for k in keys}
    for k in SHAPE_KEYS:
        if getattr(given, k) != getattr(saved, k):
            key = f"model.{k}" if (group is None or k in named) else f"model={group} (model.{k})"
            raise ConfigError(f"{key}={getattr(given, k)} contradicts {where}, whose model has "
                              f"{k}={getattr(saved, k)}: the weights cannot load into another shape; "
                              f"leave it out (the model comes from the checkpoint)")
    padded = src.get("model_shape", {}).get("padded_vocab_size")
    if padded is None or padded_vocab_size(given, run_tp) == padded:
        pass
    elif "make_vocab_size_divisible_by" in named:
        raise ConfigError(f"model.make_vocab_size_divisible_by={given.make_vocab_size_divisible_by} pads the "
                          f"vocabulary to {padded_vocab_size(given, run_tp)} rows at TP={run_tp}, {where} has {padded}")
    else:
        saved_tp = src.get("tensor_model_parallel_size") or src["config"].get("parallel", {}).get(
            "tensor_model_parallel_size", 1)
        multiple = saved.make_vocab_size_divisible_by * saved_tp
        repad = dataclasses.replace(given, make_vocab_size_divisible_by=multiple // run_tp)
        if multiple % run_tp or padded_vocab_size(repad, run_tp) != padded:
            raise ConfigError(f"parallel.tensor_model_parallel_size={run_tp}: {where} has its vocabulary padded "
                              f"to {padded} rows (a multiple of {multiple}, for TP={saved_tp}), which TP={run_tp} "
                              f"cannot split evenly; convert it again with nld-convert from-hf --tp {run_tp}")
        node.model.make_vocab_size_divisible_by = repad.make_vocab_size_divisible_by
    if not any(o.lstrip("+~").partition("=")[0] == "tokenizer.path" for o in overrides) and src["tokenizer_path"]:
        node.tokenizer.path = src["tokenizer_path"]


def load_config(overrides: list[str], world_size: int | None = None, init_source: dict | None = None):
    """Compose, type-check and validate; returns a :class:`nld_train.config.Config`."""
    from omegaconf import OmegaConf

    node = compose_config(overrides, init_source)
    with _config_errors():
        cfg = OmegaConf.to_object(node)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size is None and cfg.train.dry_run:  # the planned job, not this process
        world = cfg.nodes * cfg.gpus_per_node
    validate(cfg, world)
    validate_settings(from_eval_config(cfg.eval), prefix="eval.")
    if cfg.train.decode_task is not None and cfg.train.decode_task not in TASK_NAMES:
        raise ConfigError(f"train.decode_task: unknown task {cfg.train.decode_task!r} (known: {', '.join(TASK_NAMES)})")
    # the objective checks what depends on it (an unknown objective.name too); it imports torch
    # (lazy, see pyproject.toml), so it comes after everything that can fail without
    from nld_train.objective import objective_from_config
    objective_from_config(cfg)
    return cfg


def _cfg_flags(argv: list[str]) -> tuple[list[str], tuple | None]:
    """Hydra's ``--cfg job|all [--resolve] [--package|-p <key>]``, taken out of the overrides:
    (the overrides, (resolve, package) or None)."""
    rest, kind, resolve, package = [], None, False, None
    it = iter(argv)
    for a in it:
        if a in ("--cfg", "-c") or a.startswith("--cfg="):
            kind = a.split("=", 1)[1] if "=" in a else next(it, None)
            if kind not in ("job", "all"):
                if kind == "hydra":
                    raise UsageError("--cfg hydra: nld-train composes with Hydra's compose API and has no hydra "
                                     "runtime config; use --cfg job (or all, the same here)")
                raise UsageError(f"--cfg needs one of job, all (got {kind!r})")
        elif a in ("--package", "-p") or a.startswith("--package="):
            package = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not package:
                raise UsageError("--package needs a config key, e.g. -p train or -p run.dir")
        elif a == "--resolve":
            resolve = True
        elif a.startswith("-"):  # overrides never start with "-" (they may with "+", "++", "~")
            raise UsageError(f"unknown option {a}: nld-train takes recipe=<name> and key=value overrides, "
                             "--cfg job|all [--resolve] [-p <key>], --help")
        else:
            rest.append(a)
    if kind is None and (resolve or package):
        raise UsageError("--resolve only with --cfg job|all" if resolve else "--package only with --cfg job|all")
    return rest, ((resolve, package) if kind else None)


def _print_config(overrides: list[str], resolve: bool, package: str | None) -> int:
    """Print the composed config (or the node at ``package``) as YAML, a single value as itself.
    Nothing is validated against a world size and nothing is started: the check of a planned job
    is ``train.dry_run=true``. (``all`` = ``job``: there is no ``hydra:`` node to add.) With
    ``--resolve`` and a package only that node is resolved (the whole config would also build the
    demo corpus that ``data.path`` names)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = compose_config(overrides)
    with _config_errors():
        if package and resolve:
            tree = OmegaConf.select(node, package, default=_NO_KEY)
            if isinstance(tree, (DictConfig, ListConfig)):
                tree = OmegaConf.to_container(tree, resolve=True)
        else:
            tree = OmegaConf.to_container(node, resolve=resolve)
            for part in (package.split(".") if package else []):
                if isinstance(tree, dict) and part in tree:
                    tree = tree[part]
                elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
                    tree = tree[int(part)]
                else:
                    tree = _NO_KEY
                    break
    if tree is _NO_KEY:
        raise UsageError(f"--package {package}: no such key in the config")
    if isinstance(tree, (dict, list)):
        sys.stdout.write(OmegaConf.to_yaml(tree))
    else:
        print("null" if tree is None else tree)
    return 0


_NO_KEY = object()


def stage_overrides(cfg, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(run_dir, overrides) per stage of a pipeline recipe; user overrides reach every stage."""
    user = [o for o in overrides if not o.startswith("recipe=")]
    out, prev = [], None
    for st in cfg.pipeline:
        run_dir = str(Path(cfg.run.dir) / st.name)
        ov = [f"recipe={st.recipe}", *user, f"run.dir={run_dir}"]
        if prev is not None:
            ov.append(f"checkpoint.init_from={prev}")
        out.append((run_dir, ov))
        prev = run_dir
    return out


def stage_source(cfg) -> dict:
    """What a stage hands the next one through ``checkpoint.init_from``, as a checkpoint marker
    would say it (see :func:`model_from_checkpoint`): known before that stage has trained."""
    tp = cfg.parallel.tensor_model_parallel_size
    return {"config": dataclasses.asdict(cfg), "model_shape": model_shape(cfg.model, tp),
            "tensor_model_parallel_size": tp, "tokenizer_path": cfg.tokenizer.path,
            "source": f"the final checkpoint of stage {cfg.recipe}"}


def pipeline_configs(cfg, argv: list[str]) -> list:
    """(run_dir, overrides, Config) per stage: each later stage takes its model and tokenizer from
    the stage before it, all checked before the first one starts."""
    out, prev = [], None
    for run_dir, ov in stage_overrides(cfg, argv):
        stage = load_config(ov, init_source=stage_source(prev) if prev is not None else None)
        out.append((run_dir, ov, stage))
        prev = stage
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch loads MKL: make its CPU results independent of memory alignment, so a resumed
    # process reproduces an uninterrupted one bit for bit (costs ~2 % on CPU; no effect on CUDA).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE.format(recipes=_options("recipe"), models=_options("model"), objectives=_options("objective"),
                           parallels=_options("parallel"), datas=_options("data")))
        return 0
    try:
        argv, show = _cfg_flags(argv)
        if show:
            return _print_config(argv, *show)
        cfg = load_config(argv)
        stages = [(cfg.run.dir, argv, cfg)] if not cfg.pipeline else pipeline_configs(cfg, argv)
    except (ConfigError, UsageError, FileNotFoundError) as e:
        print(f"nld-train: configuration error: {e}", file=sys.stderr)
        return 2
    if cfg.train.dry_run:  # print the plan of every stage, train nothing (docs/slurm.md)
        from nld_train.plan import dry_run  # lazy: torch, through the objectives
        return dry_run([stage_cfg for _, _, stage_cfg in stages])
    # lazy from here on: torch and megatron load only once the config is known to be good
    from nld_train.dist import on_rank0, shutdown
    if cfg.addon.kind:  # learned sampler / LoRA drafter of a frozen LM: their own small loop (docs/addons.md)
        from nld_train.addons import run_addon
        rc = run_addon(cfg)
        shutdown()
        return rc
    from nld_train.eval.hook import eval_during_training
    from nld_train.train.trainer import Trainer
    for i, (run_dir, _, stage_cfg) in enumerate(stages):
        if len(stages) > 1:
            print(f"=== stage {i + 1}/{len(stages)}: {stage_cfg.recipe} -> {run_dir}", flush=True)
        try:  # bad input (config vs checkpoint, data files, tokenizer): one clear line, exit 2
            # the entry script, not the trainer, wires the benchmarks in (eval.interval)
            trainer = Trainer(stage_cfg, eval_hook=eval_during_training)
        except (InputError, FileNotFoundError) as e:
            print(f"nld-train: error: {e}", file=sys.stderr)
            shutdown()
            return 2
        try:
            trainer.fit()
            # rank 0 decodes; the others wait outside any collective (the next stage's start is one)
            on_rank0(functools.partial(end_of_run_decoding, trainer))
        finally:
            trainer.close()
    shutdown()
    return 0


def end_of_run_decoding(trainer) -> None:
    """A greedy AR sample (``train.sample_tokens``) and a table of every decoding mode over
    ``train.decode_prompts`` or the first problems of ``train.decode_task`` (then with accuracy),
    with the inference submodule's decoders over the trained weights (rank 0; the decoder holds the
    whole model, so TP > 1 runs skip it)."""
    from nld_train.inference import from_megatron
    from nld_train.inference.table import decode_table, encode_batch
    cfg, t = trainer.cfg, trainer.cfg.train
    if not (t.sample_tokens > 0 or t.decode_prompts or t.decode_task) or not trainer.rank0:
        return
    if trainer.layout.tp > 1:
        trainer.log("end-of-run decoding skipped at TP > 1: decode the checkpoint with nld-generate instead")
        return
    tok = trainer.tokenizer
    dec = from_megatron(trainer.model, cfg.model, eos_token_id=tok.eos_token_id,
                        block_size=cfg.objective.block_size, device=trainer.device)
    if t.sample_tokens > 0:
        ids, mask = encode_batch(tok, [t.sample_prompt], trainer.device)
        out, _ = dec.ar_generate(ids, t.sample_tokens, attention_mask=mask)
        text = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        trainer.log(f"--- AR sample (greedy, {t.sample_tokens} tokens) ---\n{t.sample_prompt}{text}\n---")
    table = dict(max_new_tokens=t.decode_tokens, block_length=cfg.objective.block_size,
                 thresholds=list(t.decode_thresholds), batch_size=t.decode_batch_size, repeats=t.decode_repeats)
    if t.decode_prompts:
        trainer.log(decode_table(dec, tok, list(t.decode_prompts), **table))
    if t.decode_task:
        prompts, check = task_prompts(t.decode_task, t.decode_task_limit)
        trainer.log(f"--- {t.decode_task}: the first {len(prompts)} problems, as nld-eval scores them ---")
        # as nld-eval encodes them: with the tokenizer's special tokens (demo_math: the document separator)
        trainer.log(decode_table(dec, tok, prompts, check=check, add_special_tokens=True, **table))


def generate_main(argv=None) -> int:
    """``nld-generate`` (:mod:`nld_train.inference.cli`) with nld-eval's tasks for ``task=``."""
    from nld_train.inference import cli as generate_cli
    return generate_cli.main(argv, task_prompts=task_prompts)


def task_prompts(name: str, limit: int):
    """The zero-shot prompts of an nld-eval task's first ``limit`` samples and ``check(i, text)``."""
    task = get_task(name)
    samples = task.samples()[:limit]
    prompts = [task.fewshot_prompt(s, 0) for s in samples]
    return [p.text for p in prompts], \
        lambda i, text: bool(task.check(samples[i], text, "fewshot", prompts[i], None)["correct"])


if __name__ == "__main__":
    sys.exit(main())
