"""Dry-run planner (nld_train/plan.py) and the FLOPs formula it shares with the trainer's MFU."""
import pytest

from nld_train.cli import load_config, main
from nld_train.config import ModelConfig, padded_vocab_size
from nld_train.objective import ARObjective, JointObjective
from nld_train.observability import train_flops_per_token
from nld_train.plan import memory_per_gpu, parameter_count

SIZES = {"nld_3b": "tp1_distopt", "nld_8b": "tp4", "nld_14b": "tp8"}


def megatron_lm_flops(m: ModelConfig, seq_length: int, batch_size: int, tp: int = 1) -> float:
    """Megatron-LM ``num_floating_point_operations`` (megatron/training/training.py,
    ``transformer_flops``), transcribed for a dense GQA SwiGLU model without MoE / MTP / MLA."""
    kv_channels = m.kv_channels or m.hidden_size // m.num_attention_heads
    query_projection_size = kv_channels * m.num_attention_heads
    key_projection_size = value_projection_size = kv_channels * m.num_query_groups
    fwd_bwd, fma, ffn_expansion = 3, 2, 3
    self_attn = fwd_bwd * fma * (
        m.hidden_size * (query_projection_size + key_projection_size + value_projection_size)
        + query_projection_size * seq_length / 2 * 2
        + query_projection_size * m.hidden_size)
    return batch_size * seq_length * (
        fwd_bwd * fma * m.hidden_size * m.ffn_hidden_size * ffn_expansion * m.num_layers
        + self_attn * m.num_layers
        + fwd_bwd * fma * m.hidden_size * padded_vocab_size(m, tp))


def _model(name):
    # stage1 reads no corpus (data.path unset): composing it is quick
    return load_config(["recipe=stage1", f"model={name}", "parallel=single", "train.seq_length=64",
                        "train.dry_run=true"]).model


@pytest.mark.parametrize("name", ["micro", "nld_3b", "nld_8b", "nld_14b"])
@pytest.mark.parametrize("seq", [64, 4096])
def test_ar_flops_equal_megatron_lm(name, seq):
    m = _model(name)
    for tp in (1, 4):
        ref = megatron_lm_flops(m, seq, batch_size=3, tp=tp) / (3 * seq)
        assert train_flops_per_token(m, seq, ARObjective(), tp=tp) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("L,B", [(64, 16), (128, 32), (96, 96)])
def test_joint_flops_count_the_joint_mask(L, B):
    """Joint = every GEMM twice (2L tokens per L data tokens) + attention over exactly the (query,
    key) pairs the joint mask allows; like Megatron's S/2 for causal, the diagonal half-pairs of the
    causal parts (L/2 in total) are not counted."""
    from nld_train.objective.masks import joint_attention_mask
    m = _model("nld_8b")
    pairs = int(joint_attention_mask(L, B).sum())
    assert pairs == L * (2 * L + 1 + B) // 2
    q = m.num_attention_heads * m.kv_channels
    linear = megatron_lm_flops(m, L, 1) / L - 6 * m.num_layers * q * L  # per token: AR minus its attention
    expected = 2 * linear + 12 * m.num_layers * q * (pairs - L / 2) / L
    joint = JointObjective(mask_token_id=1, block_size=B)
    assert train_flops_per_token(m, L, joint) == pytest.approx(expected, rel=1e-12)
    ratio = train_flops_per_token(m, L, joint) / train_flops_per_token(m, L, ARObjective())
    assert 2.0 < ratio < 2.1  # "the joint step costs ~2x AR"


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parameter_count_matches_the_built_model(dist1, one_thread, qkv_bias):
    """Planner's parameter list == the megatron model nld-train builds (micro, TP=1): every
    parameter's size and rank in order, hence the count and the sharded optimizer's partition."""
    from nld_train.model.gpt import build_model
    from nld_train.plan import parameter_numels
    cfg = load_config(["recipe=stage1", "model=micro", "parallel=single", "train.seq_length=64",
                       "train.dry_run=true", f"model.qkv_bias={str(qkv_bias).lower()}"])
    model = build_model(cfg.model, cfg.parallel, cfg.train.seq_length, seed=0)
    built = [(p.numel(), p.ndim) for p in model.parameters()]
    assert [(n, d) for n, d, _ in parameter_numels(cfg.model, 1)] == built
    assert parameter_count(cfg.model, 1)["total"] == sum(n for n, _ in built)


def test_published_sizes():
    """Totals of the three shapes against the sizes published for the Ministral-3 bases (language
    model only: 3.4B tied -> 3.8B with NLD's untied head, 8.4B, 13.5B)."""
    got = {n: parameter_count(_model(n))["total"] / 1e9 for n in SIZES}
    tied_3b = got["nld_3b"] - 131072 * 3072 / 1e9  # the base ties its head; NLD unties it in stage 1
    assert tied_3b == pytest.approx(3.4, abs=0.05)
    assert got["nld_8b"] == pytest.approx(8.4, abs=0.1)
    assert got["nld_14b"] == pytest.approx(13.5, abs=0.05)


@pytest.mark.parametrize("model", SIZES)
@pytest.mark.parametrize("recipe", ["stage1", "stage2"])
def test_dry_run_prints_plan(model, recipe, capsys):
    rc = main([f"recipe={recipe}", f"model={model}", f"parallel={SIZES[model]}", "train.dry_run=true", "nodes=32",
               "train.peak_tflops=989"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for word in ("parameters", "memory/GPU", "FLOPs/token", "steps", "GPU-hours", "fits"):
        assert word in out
    tokens = "1,000.0 B tokens" if recipe == "stage1" else "300.0 B tokens"
    assert tokens in out
    if recipe == "stage2":
        assert "(2L joint)" in out


def test_joint_activations_double():
    a = load_config(["recipe=stage1", "train.dry_run=true", "nodes=32"])
    j = load_config(["recipe=stage2", "train.dry_run=true", "nodes=32"])
    ma, mj = memory_per_gpu(a), memory_per_gpu(j)
    assert mj.activations == pytest.approx(2 * ma.activations) and mj.weights == ma.weights


def test_layout_that_cannot_fit_is_refused(capsys):
    rc = main(["recipe=stage2", "model=nld_14b", "parallel=single", "train.dry_run=true", "nodes=4"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "DOES NOT FIT" in cap.out and "refused:" in cap.out and "parallel=tp" in cap.out
    assert "plan refused" in cap.err


def test_impossible_layout_is_a_config_error(capsys):
    # TP 8 does not divide a world of 1 node x 4 GPUs
    rc = main(["recipe=stage2", "model=nld_14b", "parallel=tp8", "train.dry_run=true", "gpus_per_node=4"])
    assert rc == 2
    assert "parallel.tensor_model_parallel_size" in capsys.readouterr().err


def test_plan_keys_are_validated(capsys):
    assert main(["recipe=stage2", "train.dry_run=true", "plan.mfu=1.5"]) == 2
    assert "plan.mfu" in capsys.readouterr().err


def test_plan_adds_the_data_parallel_communication_overlap_does_not_hide(capsys):
    """The step time = compute + the exposed DP communication (nld_train/plan.py's model): the whole
    fp32 gradient all-reduce without parallel.overlap_grad_reduce; with it, minus the last
    micro-batch's backward (2/3 of its compute), never below the last bucket's all-reduce."""
    from nld_train.plan import comm_per_step, parameter_numels
    base = ["recipe=stage2", "model=nld_8b", "parallel=tp4", "train.dry_run=true", "nodes=32", "train.peak_tflops=989"]
    on = load_config(base)
    params = parameter_count(on.model, 4)["per_gpu"]
    grad = 2 * 63 / 64 * 4 * params / 40e9  # DP 64 across nodes at plan.inter_node_gb_per_s
    off = comm_per_step(load_config([*base, "parallel.overlap_grad_reduce=false"]), 2.0)
    assert off["exposed"] == pytest.approx(grad) and not off["overlap"]
    c = comm_per_step(on, 2.0)  # 512 / (1 x 64) = 8 micro-batches per rank
    assert c["overlap"] and c["exposed"] == pytest.approx(grad - 2 / 3 * 2.0 / 8)
    # a long backward hides all but the last bucket: the one with the embedding (> 64 M params)
    embedding = parameter_numels(on.model, 4)[0][0]
    assert comm_per_step(on, 100.0)["exposed"] == pytest.approx(grad * embedding / params)
    # one bucket (larger than the model): nothing to overlap with
    one = comm_per_step(load_config([*base, f"parallel.ddp_bucket_size={params}"]), 100.0)
    assert one["exposed"] == pytest.approx(grad)
    # one node: NVLink bandwidth; the distributed optimizer adds its parameter broadcast
    node = comm_per_step(load_config([*base, "nodes=1", "parallel.overlap_grad_reduce=false",
                                      "parallel.distributed_optimizer=true"]), 2.0)
    bcast = 1 / 2 * 4 * params / 360e9
    assert node["exposed"] == pytest.approx(2 * 1 / 2 * 4 * params / 360e9 + bcast)
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "overlapped with the last micro-batch's backward" in out and "s of communication" in out


# names as torch.cuda.get_device_name() reports them (CUDA device properties), per part
DEVICE_PEAKS = [
    ("NVIDIA H100 80GB HBM3", 989.4),     # H100 SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),               # H200 SXM
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2500.0),
    # no MFU rather than a wrong one: MIG slices, parts not in the table, look-alikes
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", None),
    ("NVIDIA H200 MIG 7g.141gb", None),
    ("NVIDIA H800", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA H100", None),
    ("", None),
]


@pytest.mark.parametrize("name,tflops", DEVICE_PEAKS)
def test_peak_lookup_by_exact_device_name(name, tflops):
    from nld_train.observability import peak_tflops_for
    got, why = peak_tflops_for(name)
    assert got == tflops, why
    if "MIG" in name:
        assert "MIG slice" in why


def test_one_peak_key_for_trainer_planner_and_benches(capsys, monkeypatch):
    """train.peak_tflops overrides detection; null = detected; undetected = no MFU and no time."""
    import torch

    from nld_train import observability as O
    assert O.resolve_peak_flops(500.0) == (500e12, "train.peak_tflops")
    assert O.resolve_peak_flops(500.0, bf16=False)[0] == 500e12  # stated by the user: used as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert O.resolve_peak_flops(None)[0] == 756e12
    assert O.resolve_peak_flops(None, bf16=False)[0] is None      # fp32 run vs a bf16 peak: no MFU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 MIG 2g.20gb")
    flops, why = O.resolve_peak_flops(None)
    assert flops is None and "MIG" in why and "train.peak_tflops" in why
    # the planner: the detected peak, the configured one, or no time at all
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 NVL")
    assert main(["recipe=stage1", "model=nld_3b", "parallel=tp1_distopt", "train.dry_run=true", "nodes=32"]) == 0
    assert "of 835 TFLOP/s per GPU (NVIDIA H100 NVL datasheet" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert main(["recipe=stage1", "model=nld_3b", "parallel=tp1_distopt", "train.dry_run=true", "nodes=32"]) == 0
    out = capsys.readouterr().out
    assert "time        not estimated" in out and "GPU-hours" not in out and "fits" in out
    assert main(["recipe=stage1", "model=nld_3b", "parallel=tp1_distopt", "train.dry_run=true", "nodes=32",
                 "train.peak_tflops=2250"]) == 0
    assert "of 2250 TFLOP/s per GPU (train.peak_tflops" in capsys.readouterr().out
    assert main(["recipe=stage1", "train.dry_run=true", "train.peak_tflops=0"]) == 2
    assert "train.peak_tflops" in capsys.readouterr().err
    with pytest.raises(Exception, match="peak_tflops"):   # the old planner-only key is gone
        load_config(["recipe=stage1", "plan.peak_tflops=989"])


def test_te_version_range_matches_megatron_core():
    """pyproject's [gpu] pin and the start-up check agree with megatron-core 0.16.1's own range."""
    import re
    from importlib import metadata

    from nld_train.dist import TE_SUPPORTED, te_version_note
    from tests.conftest import REPO
    req = [r for r in metadata.requires("megatron-core") if r.startswith("transformer-engine")]
    assert req and ">=2.9.0a0" in req[0] and "<2.12.0" in req[0], req
    pin = re.search(r'"transformer-engine\[pytorch\]([^"]*)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pin == ">=2.9.0a0,<2.12.0"
    assert TE_SUPPORTED == ((2, 9), (2, 12))
    for ok in ("2.9.0", "2.10.0+cu13", "2.11.1"):
        assert te_version_note(ok) is None
    for bad in ("2.8.0", "2.12.0", "1.13.0"):
        assert "outside the range" in te_version_note(bad)
