"""``nld-train recipe=<name> [group=option ...] [key=value ...]`` (Hydra compose API).

The config is composed and checked against the typed schema (:mod:`nld_train.config`) before
torch or megatron are imported, so a wrong key, a wrong type or an impossible layout fails at
once, naming the key. A recipe with a ``pipeline`` runs its stages one after another in
``run.dir/<stage>``, each initialised from the previous stage's final checkpoint.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from nld_train.config import Config, ConfigError, validate
from nld_train.errors import InputError
from nld_train.eval.settings import from_eval_config, validate_settings
from nld_train.plan import dry_run

USAGE = """usage: nld-train recipe=<name> [group=option ...] [key=value ...]

recipes:  {recipes}
groups:   model={models}  objective={objectives}  parallel={parallels}  data={datas}
examples: nld-train recipe=demo
          nld-train recipe=smoke run.dir=runs/x train.max_steps=12 checkpoint.interval=3
          torchrun --nproc_per_node=2 -m nld_train.cli recipe=smoke parallel=tp2
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


def _demo_corpus() -> str:
    from nld_train.data.demo_corpus import ensure_demo_corpus  # lazy: megatron (see pyproject.toml)
    return ensure_demo_corpus()


class UsageError(ValueError):
    pass


def load_config(overrides: list[str], world_size: int | None = None):
    """Compose, type-check and validate; returns a :class:`nld_train.config.Config`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    recipe = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if not recipe:
        raise UsageError("missing recipe=<name>; available: " + _options("recipe"))
    _register()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            node = compose("config", overrides=list(overrides))
        # re-merge into a fresh schema: keys appended with `+` must exist in the dataclasses too
        node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(node), {"recipe": recipe[-1]})
        cfg = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as e:
        msg, cause = str(e), e.__cause__
        while cause is not None:  # Hydra wraps the message that names the key; show the chain
            msg += f"\n  {cause}"
            cause = cause.__cause__
        raise ConfigError(msg) from None
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size is None and cfg.train.dry_run:  # the planned job, not this process
        world = cfg.nodes * cfg.gpus_per_node
    validate(cfg, world)
    validate_settings(from_eval_config(cfg.eval), prefix="eval.")
    return cfg


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
        cfg = load_config(argv)
        stages = [(cfg.run.dir, argv, cfg)] if not cfg.pipeline else \
            [(d, ov, load_config(ov)) for d, ov in stage_overrides(cfg, argv)]
    except (ConfigError, UsageError, FileNotFoundError) as e:
        print(f"nld-train: configuration error: {e}", file=sys.stderr)
        return 2
    if cfg.train.dry_run:  # print the plan of every stage, train nothing (docs/slurm.md)
        return dry_run([stage_cfg for _, _, stage_cfg in stages])
    # lazy from here on: torch and megatron load only once the config is known to be good
    from nld_train.dist import shutdown
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
            end_of_run_decoding(trainer)
        finally:
            trainer.close()
    shutdown()
    return 0


def end_of_run_decoding(trainer) -> None:
    """A greedy AR sample (``train.sample_tokens``) and a table of all four decoding modes
    (``train.decode_prompts``), with the inference submodule's decoders over the trained weights
    (rank 0; the decoder holds the whole model, so TP > 1 runs skip it)."""
    from nld_train.inference import from_megatron
    from nld_train.inference.cli import decode_table, encode_batch
    cfg, t = trainer.cfg, trainer.cfg.train
    if not (t.sample_tokens > 0 or t.decode_prompts) or not trainer.rank0:
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
    if t.decode_prompts:
        trainer.log(decode_table(dec, tok, list(t.decode_prompts), max_new_tokens=t.decode_tokens,
                                 block_length=cfg.objective.block_size, thresholds=list(t.decode_thresholds)))


if __name__ == "__main__":
    sys.exit(main())
