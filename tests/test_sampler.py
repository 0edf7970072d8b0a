"""Learned sampler: features on a hand-built case, labels of the data generator, the commit policy
inside generate, save/load, overfitting a tiny set with the add-on loop, and the recipe end to end."""
import json
import math

import pytest
import torch

from nld_train.inference import NLDConfig, NLDForDecoding
from nld_train.inference.sampler import (
    NUM_FEATURES,
    LearnedSamplerPolicy,
    SamplerModel,
    SamplerModelConfig,
    as_sampler,
    block_features,
    load_sampler,
    save_sampler,
)

MASK = 1
pytestmark = pytest.mark.usefixtures("one_thread")


def lm(seed=0, vocab=40):
    cfg = NLDConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK, eos_token_id=0)
    return NLDForDecoding.random(cfg, seed=seed, std=0.3, dtype=torch.float64).eval()


def tiny_sampler(vocab=40, bias=None, seed=0):
    torch.manual_seed(seed)
    s = SamplerModel(SamplerModelConfig(vocab_size=vocab, mask_token_id=MASK, token_dim=4, d_model=16,
                                        num_layers=1, num_heads=2, ffn_hidden_size=32))
    if bias is not None:
        with torch.no_grad():
            s.head.weight.zero_()
            s.head.bias.fill_(bias)
    return s.eval()


def test_features_on_a_hand_built_block():
    B = 3
    # position 0: committed token 4; positions 1, 2 masked. Probabilities chosen by hand.
    probs = torch.tensor([[[0.05, 0.05, 0.10, 0.10, 0.60, 0.10],       # mask id 1 has p 0.05
                           [0.00, 0.50, 0.30, 0.10, 0.05, 0.05],       # the mask id is the most likely
                           [0.10, 0.10, 0.35, 0.25, 0.15, 0.05]]])
    logits = probs.clamp(min=1e-9).log()
    block = torch.tensor([[4, MASK, MASK]])
    num, ids, top1 = block_features(logits, block, MASK, step=2)
    assert num.shape == (1, B, NUM_FEATURES) and ids.shape == (1, B, 4) and top1.shape == (1, B)
    p = probs / probs.sum(-1, keepdim=True)
    # top-1 never the mask id: position 1's candidate is token 2 (p 0.3), not the mask (p 0.5)
    assert top1.tolist() == [[4, 2, 2]]
    assert torch.allclose(num[0, 1, :5], torch.tensor([0.30, 0.10, 0.05, 0.05, 0.0]), atol=1e-6)
    assert math.isclose(num[0, 1, 6], 0.30 - 0.10, abs_tol=1e-6)          # margin
    assert math.isclose(num[0, 1, 11], 0.50, abs_tol=1e-6)                 # p(mask)
    assert math.isclose(num[0, 0, 8], float(-(p[0, 0] * p[0, 0].log()).sum()), abs_tol=1e-5)  # entropy
    assert num[0, :, 12].tolist() == [0.0, 1.0, 1.0]                       # is_masked
    assert torch.allclose(num[0, :, 13], torch.full((B,), 2 / 3))          # masked ratio
    assert num[0, :, 14].tolist() == [0.0, 0.5, 1.0]                       # relative position
    assert torch.allclose(num[0, :, 15], torch.full((B,), 2 / 3))          # step / B
    assert torch.allclose(num[0, :, 16], torch.full((B,), math.log(3)))    # log(#masked + 1)
    assert ids[0, 0].tolist()[:2] == [4, 4] and ids[0, 1, 0] == MASK and ids[0, 1, 1] == 2


@pytest.mark.parametrize("label", ["ar", "ground_truth"])
def test_recorded_labels_are_top1_vs_reference(label):
    from nld_train.addons.sampler import record_denoising
    model = lm()
    g = torch.Generator().manual_seed(0)
    P, B, nB = 4, 4, 2
    windows = torch.randint(2, 40, (3, P + nB * B), generator=g)
    rec = record_denoising(model, windows, P, nB, B, label, [1.0], seed=0)
    ref = model.ar_generate(windows[:, :P], nB * B, eos_token_id=-1)[0][:, P:] if label == "ar" else windows[:, P:]
    # threshold 1.0 commits one token per pass: B-1 passes per block and row
    assert len(rec["row"]) == 3 * nB * (B - 1)
    assert rec["features"].shape == (len(rec["row"]), B, NUM_FEATURES)
    # first pass of block 0, recomputed by hand
    cache = model.new_cache(3, 64)
    seed_logits = model.causal_pass(windows[:, :P], cache, logits_to_keep=1)
    blk = torch.full((3, B), MASK)
    blk[:, 0] = model.pick_tokens(seed_logits[:, -1])
    logits = model.block_pass(blk, cache)
    num, _, top1 = block_features(logits, blk, MASK, 0)
    first = (rec["block"] == 0) & (rec["step"] == 0)
    assert torch.allclose(torch.from_numpy(rec["features"][first]).double(), num.double(), atol=1e-6)
    assert (torch.from_numpy(rec["label"][first]) == (top1 == ref[:, :B])).all()
    assert rec["masked"][first][:, 0].sum() == 0 and rec["masked"][first][:, 1:].all()
    if label == "ar":   # the AR seed equals the reference's first token of the block
        assert (blk[:, 0] == ref[:, 0]).all()


def test_sampler_policy_in_generate():
    model = lm()
    ids = torch.tensor([[5, 6, 7]])
    # a sampler that says "commit everything": one denoise pass per block
    out_all, nfe_all = model.generate(ids, 8, block_length=4, sampler=tiny_sampler(bias=50.0), threshold=0.5,
                                      eos_token_id=-1)
    assert nfe_all == 2 * 2 and model.last_stats.accepted == [[3, 3]]
    # ... and "commit nothing": the best-scoring position only, B-1 passes per block
    _, nfe_one = model.generate(ids, 8, block_length=4, sampler=tiny_sampler(bias=-50.0), threshold=0.5,
                                eos_token_id=-1)
    assert nfe_one == 2 * 4 and model.last_stats.accepted == [[1, 1, 1, 1, 1, 1]]
    # committed tokens are the LM's candidates: with everything committed in one pass the block equals
    # the threshold-0 rule's result
    ref, _ = model.generate(ids, 8, block_length=4, threshold=0.0, eos_token_id=-1)
    assert torch.equal(out_all, ref)
    with pytest.raises(ValueError, match="sampler="):
        model.generate(ids, 8, block_length=4, sampler=tiny_sampler(), threshold=None)
    with pytest.raises(ValueError, match="vocab"):
        as_sampler(tiny_sampler(vocab=41), model)


def test_policy_needs_observe():
    pol = LearnedSamplerPolicy(tiny_sampler(), 0.5)
    with pytest.raises(RuntimeError, match="observe"):
        pol.select(None, None, None, 0, None, 0)


def test_save_load_roundtrip(tmp_path):
    s = tiny_sampler(seed=3)
    with torch.no_grad():
        s.token_table.normal_()
        s.feature_mean.fill_(0.1)
    save_sampler(s, tmp_path / "run" / "sampler", extra={"base_model": "x"})
    back = load_sampler(tmp_path / "run")          # a run dir holding sampler/ works too
    logits, block = torch.randn(2, 4, 40), torch.tensor([[3, MASK, MASK, 5], [MASK] * 4])
    assert torch.equal(s.score(logits, block, 1), back.score(logits, block, 1))
    assert json.loads((tmp_path / "run" / "sampler" / "config.json").read_text())["base_model"] == "x"
    with pytest.raises(FileNotFoundError, match="no learned sampler"):
        load_sampler(tmp_path)


def test_sampler_overfits_a_tiny_set_with_the_addon_loop(tmp_path):
    from nld_train.addons.loop import fit
    from nld_train.addons.sampler import bce_sum
    from nld_train.config import Config
    g = torch.Generator().manual_seed(0)
    n, B = 6, 8
    feats = torch.randn(n, B, NUM_FEATURES, generator=g)
    ids = torch.randint(0, 40, (n, B, 4), generator=g)
    masked = torch.rand(n, B, generator=g) < 0.7
    label = torch.rand(n, B, generator=g) < 0.5     # random labels: only memorisation fits them
    s = tiny_sampler()
    s.train()
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size = 80, 6, 3
    cfg.train.lr, cfg.train.lr_schedule, cfg.train.weight_decay, cfg.train.log_interval = 2e-2, "constant", 0.0, 1000
    cfg.checkpoint.interval = 0

    def micro_batches(idx):
        j = torch.arange(n)         # the whole set every step, in two micro-batches
        return [(j[:3], float(masked[:3].sum())), (j[3:], float(masked[3:].sum()))]

    def loss_sum(j):
        loss, correct = bce_sum(s, feats[j], ids[j], masked[j], label[j])
        return loss, {"acc": correct}

    fit(cfg, s, n, micro_batches, loss_sum, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 0.5 and rows[-1]["loss"] < 0.05 and rows[-1]["acc"] == 1.0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000080"


def test_recipe_config_errors():
    from nld_train.cli import load_config
    from nld_train.config import ConfigError
    with pytest.raises(ConfigError, match="sampler.label"):
        load_config(["recipe=sampler", "sampler.label=gold"], world_size=1)
    with pytest.raises(ConfigError, match="addon.base_model"):
        load_config(["recipe=lora_drafter", "addon.base_model=null"], world_size=1)
    with pytest.raises(ConfigError, match="lora.loss"):
        load_config(["recipe=lora_drafter", "lora.loss=mse"], world_size=1)


def test_recipes_end_to_end(dist1, tmp_path):
    """Both recipes on a 1-step smoke checkpoint with tiny sizes: data, training, artifacts that the
    decoders take, datasets-readable shards, and a second start that resumes instead of retraining."""
    import datasets

    from nld_train.addons import run_addon
    from nld_train.cli import load_config
    from nld_train.inference import load_model
    from tests.test_trainer import make_trainer
    tr = make_trainer(tmp_path, "train.max_steps=1", name="lm")
    tr.train_step(0)
    tr.step = 1
    tr.save(sync=True)
    tr.close()
    common = [f"addon.base_model={tmp_path / 'lm'}", "addon.gen_batch_size=4", "train.max_steps=3",
              "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1"]
    s_cfg = load_config(["recipe=sampler", f"run.dir={tmp_path / 's'}", *common, "sampler.num_sequences=8",
                         "sampler.prompt_length=8", "sampler.num_blocks=1", "sampler.block_length=8",
                         "sampler.d_model=16", "sampler.num_heads=2", "sampler.num_layers=1",
                         "sampler.ffn_hidden_size=16", "sampler.token_dim=4"], world_size=1)
    assert run_addon(s_cfg) == 0
    l_cfg = load_config(["recipe=lora_drafter", f"run.dir={tmp_path / 'l'}", *common, "lora.num_sequences=4",
                         "lora.prompt_length=8", "lora.response_length=16", "lora.block_length=8",
                         "lora.rank=4", "lora.alpha=16", "lora.drafts_per_sequence=2"], world_size=1)
    assert run_addon(l_cfg) == 0
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "s" / "sampler_data"), split="train")
    info = json.loads((tmp_path / "s" / "sampler_data" / "info.json").read_text())
    assert len(ds) == info["num_examples"] > 0 and len(ds[0]["features"]) == 8 * NUM_FEATURES
    # installed next to the model, where the HF export picks them up
    assert (tmp_path / "lm" / "sampler" / "model.safetensors").is_file()
    assert (tmp_path / "lm" / "linear_spec_lora" / "adapter_model.safetensors").is_file()
    for run in ("s", "l"):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
    model = load_model(tmp_path / "lm")
    ids = torch.tensor([[5, 6, 7]])
    model.generate(ids, 16, block_length=8, sampler=tmp_path / "s", threshold=0.9)
    model.linear_spec_generate(ids, 16, block_length=8, lora=tmp_path / "l")
    # started again: resumes at step 3 and trains nothing more
    assert run_addon(s_cfg) == 0
    assert len((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()) == 3
    # other data settings on the same data folder are refused, naming the key
    bad = load_config(["recipe=sampler", f"run.dir={tmp_path / 's2'}", *common,
                       f"sampler.data_dir={tmp_path / 's' / 'sampler_data'}", "sampler.num_sequences=9",
                       "sampler.prompt_length=8", "sampler.num_blocks=1", "sampler.block_length=8"], world_size=1)
    assert run_addon(bad) == 2
