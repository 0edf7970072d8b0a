"""``checkpoint.init_from`` carries the model and the tokenizer (issue 18 item 1): a converted HF
model trains with a shipped recipe and no ``model.*`` / ``tokenizer.path``; what the command line
says about the model is compared with the checkpoint and a shape change is refused, naming the key;
a vocabulary padded for another TP is re-padded or refused naming ``--tp``."""
import pytest

from tests.conftest import run_cli
from tests.test_convert import make_hf

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["recipe=stage2", "parallel=single", "train.precision=fp32", "train.seq_length=256",
       "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2"]


@pytest.fixture(scope="module")
def conv(tmp_path_factory, dist1):
    """A tiny HF Llama (demo tokenizer, vocabulary 8200) converted for TP=1 and for TP=2."""
    from nld_train.convert.importer import from_hf
    root = tmp_path_factory.mktemp("init_from")
    hf = make_hf("llama", root / "hf")
    return dict(hf=hf, tp1=from_hf(root / "hf", root / "tp1").parents[1],
                tp2=from_hf(root / "hf", root / "tp2", tp=2).parents[1], root=root)


def _load(conv, *over, key="tp1", world_size=1):
    from nld_train.cli import load_config
    return load_config([*RUN, f"checkpoint.init_from={conv[key]}", "data.path=/nonexistent/corpus", *over],
                       world_size=world_size)


def test_model_and_tokenizer_come_from_the_checkpoint(conv):
    cfg = _load(conv)
    hf = conv["hf"].config
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
            m.kv_channels, m.vocab_size) == (2, 48, 4, 2, 80, 16, 8200)
    assert m.name == "hf_hf" and m.mask_token_id == 1 and hf.vocab_size == 8200
    assert cfg.tokenizer.path == str(conv["tp1"] / "tokenizer")
    # the command line still decides what does not change a tensor's shape
    cfg = _load(conv, "model.rope_theta=5000", "model.max_position_embeddings=512", "tokenizer.path=/my/tok")
    assert cfg.model.rope_theta == 5000 and cfg.model.max_position_embeddings == 512
    assert cfg.tokenizer.path == "/my/tok" and cfg.model.num_layers == 2
    # equal shape values are fine
    assert _load(conv, "model.num_layers=2").model.hidden_size == 48


@pytest.mark.parametrize("over, key", [("model.num_layers=3", "model.num_layers=3"),
                                       ("model.vocab_size=9000", "model.vocab_size=9000"),
                                       ("model=tiny", "model=tiny (model.num_layers)")])
def test_a_contradicting_model_is_refused_naming_the_key(conv, over, key):
    from nld_train.config import ConfigError
    with pytest.raises(ConfigError, match="contradicts checkpoint.init_from") as e:
        _load(conv, over)
    assert str(e.value).startswith(key), e.value


def test_padded_vocabulary_is_repadded_for_another_tp_or_refused(conv):
    from nld_train import checkpoint as ckpt
    from nld_train.config import ConfigError, model_shape
    for key, tp in (("tp1", 2), ("tp2", 1), ("tp2", 2)):
        cfg = _load(conv, f"parallel.tensor_model_parallel_size={tp}", key=key, world_size=tp)
        saved = ckpt.read_meta(ckpt.resolve(conv[key]))["model_shape"]
        assert model_shape(cfg.model, tp) == saved, (key, tp)
    # 128 rows (TP=1) cannot be split in 3 equal aligned shards: convert again with --tp 3
    with pytest.raises(ConfigError, match=r"--tp 3"):
        _load(conv, "parallel.tensor_model_parallel_size=3", world_size=3)
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by"):
        _load(conv, "model.make_vocab_size_divisible_by=256")


def test_a_missing_init_from_is_a_config_error(tmp_path):
    from nld_train.cli import load_config
    from nld_train.config import ConfigError
    with pytest.raises(ConfigError, match=f"checkpoint.init_from={tmp_path}/nope"):
        load_config([*RUN, f"checkpoint.init_from={tmp_path}/nope", "data.path=x"])


def test_stage2_trains_from_a_converted_model_with_no_model_keys(conv, tmp_path):
    """The acceptance command: a shipped recipe, the converted folder, no model.* and no tokenizer.path."""
    from nld_train.data.demo_corpus import ensure_demo_corpus
    data = ensure_demo_corpus()
    r = run_cli([*RUN, f"checkpoint.init_from={conv['tp1']}", f"data.path={data}", "data.split='100,0,0'", f"run.dir={tmp_path}/run",
                 "train.log_interval=1", "checkpoint.interval=0"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"initialised weights from {conv['tp1']}" in r.stdout
    assert "FutureWarning" not in r.stderr, r.stderr   # item 5: no library warning spam on load
    r = run_cli([*RUN, f"checkpoint.init_from={conv['tp1']}", f"data.path={data}", f"run.dir={tmp_path}/run2",
                 "model.num_layers=4"], timeout=300)
    assert r.returncode == 2 and "model.num_layers=4 contradicts checkpoint.init_from" in r.stderr, r.stderr


def test_a_checkpoint_load_raises_none_of_the_library_future_warnings(conv):
    """Issue 18 item 5: megatron / torch.distributed.checkpoint's three FutureWarnings (ShardedTensor,
    load_state_dict) are silenced around our load, and only there: the same load without our
    wrapper still raises them (so this test sees them when the wrapper goes)."""
    import warnings

    from megatron.core import dist_checkpointing

    from nld_train import checkpoint as ckpt
    from nld_train.config import ParallelConfig, model_config_from_dict
    from nld_train.model.gpt import build_model
    step = ckpt.resolve(conv["tp1"])
    mcfg = model_config_from_dict(ckpt.run_config(step)["model"])
    model = build_model(mcfg, ParallelConfig(), mcfg.max_position_embeddings, seed=3)

    def future_warnings(load):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            load()
        return sorted({(w.filename.split("site-packages/")[-1], str(w.message)[:40]) for w in seen
                       if issubclass(w.category, FutureWarning)})

    before = list(warnings.filters)
    assert future_warnings(lambda: ckpt.load(step, model, None, restore_rng=False)) == []
    assert warnings.filters == before   # no global filter left behind
    raw = future_warnings(lambda: dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step)))
    assert len(raw) == 3 and {m for _, m in raw} == {"`load_state_dict` is deprecated and will",
                                                      "Please use DTensor instead and we are de"}, raw
