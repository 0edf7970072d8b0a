"""A decoding mode and an objective defined and registered HERE, in the test file: the trainer, the
planner, nld-generate, nld-eval, the report and the HF wrapper take them with no other edit
(docs/architecture.md, "Adding a decoding mode / an objective")."""
import json

import pytest
import torch

from nld_train import decoding_modes
from nld_train.cli import load_config
from nld_train.errors import ConfigError
from nld_train.objective import ARObjective, Objective, objective_names, register_objective, unregister_objective
from nld_train.objective.losses import ar_sums

SMALL = ["recipe=smoke", "train.global_batch_size=4", "wandb.mode=disabled"]


# -- the toy objective: AR loss on every second position only ----------------------------------
class EvenPositionsObjective(Objective):
    name = "toy_even"

    def __init__(self, ar_weight: float = 1.0, normalization: str = "combined"):
        super().__init__(alpha=0.0, ar_weight=ar_weight, normalization=normalization)
        self._ar = ARObjective(ar_weight, normalization)

    @classmethod
    def check_config(cls, cfg):
        if cfg.train.seq_length % 4:
            raise ConfigError(f"train.seq_length: {cfg.train.seq_length} is not a multiple of 4 (toy_even)")

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.objective.ar_weight, cfg.objective.loss_normalization)

    @property
    def data_alignment(self):
        return 4

    def describe(self):
        return " (every second position)"

    def prepare(self, tokens, labels, loss_mask, sample_indices, document_ids=None, position_ids=None):
        prep = self._ar.prepare(tokens, labels, loss_mask, sample_indices, document_ids, position_ids)
        prep.loss_mask = prep.loss_mask * (torch.arange(tokens.shape[1], device=tokens.device) % 2 == 0)
        prep.n_ar = prep.loss_mask.sum()
        return prep

    def sums(self, ce, prepared):
        s_ar, _ = ar_sums(ce, prepared.loss_mask)
        return s_ar, torch.zeros((), device=s_ar.device)


# -- the toy decoding mode: AR, recording the shared settings it was given ---------------------
CALLS = []


def toy_generate(decoder, input_ids, max_new_tokens, block_length=32, threshold=0.9, **kw):
    CALLS.append((block_length, threshold))
    out, nfe = decoder.ar_generate(input_ids, max_new_tokens, **kw)
    decoder.last_stats.mode = "toy"
    return out, nfe


@pytest.fixture(scope="module")
def registered():
    register_objective(EvenPositionsObjective)
    decoding_modes.register_mode(decoding_modes.DecodingMode(
        "toy", toy_generate, nfe="as AR", kwargs={"block_length": "block_length", "threshold": "threshold"},
        sweep_thresholds=True, equals_ar=True, marker=("P", "tab:olive")))
    yield
    unregister_objective("toy_even")
    decoding_modes.unregister_mode("toy")


@pytest.fixture(scope="module")
def toy_run(registered, dist1, tmp_path_factory, one_thread):
    """Two steps of the smoke recipe with the toy objective, and its final checkpoint."""
    import nld_train.train.trainer as trainer_module
    from nld_train.train.trainer import Trainer
    tmp = tmp_path_factory.mktemp("toy")
    aligns, build = [], trainer_module.build_datasets

    def spy(*a, **k):
        aligns.append(a[-1])
        return build(*a, **k)
    trainer_module.build_datasets = spy  # the name the trainer calls
    try:
        tr = Trainer(load_config([*SMALL, f"run.dir={tmp / 'run'}", "objective.name=toy_even", "train.max_steps=2",
                                  "train.log_interval=1"], world_size=1))
    finally:
        trainer_module.build_datasets = build
    try:
        tr.fit()
    finally:
        tr.close()
    return tr, aligns, tmp / "run"


def test_trainer_and_planner_take_the_toy_objective(toy_run):
    from nld_train.observability import train_flops_per_token
    from nld_train.plan import memory_per_gpu, plan
    tr, aligns, run = toy_run
    assert type(tr.objective) is EvenPositionsObjective and aligns == [4]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert "loss_diff" not in rows[0] or rows[0]["loss_diff"] is None
    assert tr.flops_per_token == train_flops_per_token(tr.cfg.model, 64, ARObjective())  # the AR layout
    cfg = load_config([*SMALL, "objective.name=toy_even", "train.dry_run=true", "gpus_per_node=1"])
    report, fits = plan(cfg)
    assert "objective=toy_even (every second position)" in report and fits
    assert "GFLOP toy_even (1.00x AR)" in report and "GFLOP stage 2 (joint, " in report
    joint = load_config([*SMALL, "train.dry_run=true", "gpus_per_node=1"])
    assert memory_per_gpu(cfg).activations * 2 == pytest.approx(memory_per_gpu(joint).activations)
    # its own check runs when the config is loaded, naming the key
    with pytest.raises(ConfigError, match=r"train\.seq_length: 62 is not a multiple of 4"):
        load_config([*SMALL, "objective.name=toy_even", "train.seq_length=62"])


def test_unknown_objective_names_the_key(registered):
    assert "toy_even" in objective_names()
    with pytest.raises(ConfigError, match=r"objective\.name: 'toy_odd' is not one of \['ar', 'joint', 'toy_even'\]"):
        load_config([*SMALL, "objective.name=toy_odd"])


def test_nld_generate_takes_the_toy_mode(toy_run, capsys):
    from nld_train.inference.cli import main
    _, _, run = toy_run
    args = [f"checkpoint={run}", "prompt=ROMEO:", "max_new_tokens=16", "block_length=8"]
    CALLS.clear()
    assert main(args + ["mode=toy", "threshold=0.5"]) == 0
    # one warm-up decode, then the timed repeats (3 by default)
    assert "--- mode=toy " in capsys.readouterr().out and CALLS == [(8, 0.5)] * 4
    assert main(args + ["mode=all", "thresholds=0.9,0.7", "sol=false"]) == 0
    table = capsys.readouterr().out
    assert "; toy@t = confidence threshold t)" in table
    toy_rows = [ln.split() for ln in table.splitlines() if ln.startswith("toy@")]
    assert [r[0] for r in toy_rows] == ["toy@0.9", "toy@0.7"] and all(r[-2] == "1/1" for r in toy_rows)
    assert main(["help"]) == 0
    assert "mode=ar|diffusion|linear_spec|quadratic_spec|toy|all" in capsys.readouterr().out


def test_nld_eval_and_report_take_the_toy_mode(toy_run, tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    from nld_train.eval.cli import main
    _, _, run = toy_run
    labels = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: labels.append(k.get("label")) or
                        plot(self, *a, **k))
    out = tmp_path / "eval"
    CALLS.clear()
    assert main([f"checkpoint={run}", f"out={out}", "tasks=[gsm8k]", "modes=[ar,toy]", "limit=2",
                 "max_new_tokens=16", "thresholds=[0.9,0.6]", "sol=false", "progress=false"]) == 0, \
        capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]["gsm8k"]["modes"]) == ["ar", "toy@0.9", "toy@0.6"]
    assert sorted(set(CALLS)) == [(16, 0.6), (16, 0.9)]   # the checkpoint's block size, each threshold
    # greedy AR underneath: the same counts as the ar rows
    modes = res["tasks"]["gsm8k"]["modes"]
    for key in ("toy@0.9", "toy@0.6"):
        assert {k: modes[key][k] for k in ("n", "nfe", "generated_tokens", "accuracy")} == \
            {k: modes["ar"][k] for k in ("n", "nfe", "generated_tokens", "accuracy")}
    assert "| gsm8k | toy@0.6 |" in (out / "results.md").read_text()
    assert "toy (thresholds)" in labels and (out / "plots" / "gsm8k.png").is_file()
    # the training config's eval.* accepts it too, and still refuses a mode nobody registered
    cfg = load_config([*SMALL, "eval.modes=[toy]"])
    assert cfg.eval.modes == ["toy"]
    with pytest.raises(ConfigError, match="eval.modes: unknown mode 'toy2'"):
        load_config([*SMALL, "eval.modes=[toy2]"])


def test_hf_wrapper_takes_the_toy_mode(toy_run):
    from nld_train.inference import load_model
    from nld_train.inference.hf_format import hf_config_dict
    from nld_train.inference.hf_wrapper import NLDHFConfig, NLDHFForCausalLM
    _, _, run = toy_run
    dec = load_model(run)
    hf = NLDHFForCausalLM(NLDHFConfig(**hf_config_dict(dec.config, "llama")))
    missing, unexpected = hf.load_state_dict(dec.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    ids = torch.tensor([[5, 6, 7, 8]])
    CALLS.clear()
    got, nfe = hf.decode("toy", ids, 8, block_length=4, threshold=0.3)
    ref, ref_nfe = dec.ar_generate(ids, 8)
    assert torch.equal(got, ref) and nfe == ref_nfe and CALLS == [(4, 0.3)] and hf.last_stats.mode == "toy"
    # the registered methods of the built-in modes reach the decoder the same way
    assert torch.equal(hf.ar_generate(ids, 8)[0], ref)
    assert not hasattr(hf, "toy_generate")   # a function mode has no method: decode("toy", ...) only
