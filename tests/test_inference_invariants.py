"""Decoding invariants: greedy self-speculation == greedy AR token for token; NFE per spec.

float64 everywhere: the modes compute the same logits through different batch shapes and masks,
so they agree to ~1e-15; in float32 a near-tie could flip an argmax and hide or fake a bug.
"""
import re

import pytest
import torch

from nld_train.inference import NLDConfig, NLDForDecoding

MASK, EOS = 1, 0


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed=0, vocab=48, std=0.3):
    """Peaky random weights and a small vocabulary: drafts are accepted often enough that the
    multi-token acceptance paths run (checked below), yet the text is not constant."""
    cfg = NLDConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK, eos_token_id=EOS)
    return NLDForDecoding.random(cfg, seed=seed, std=std, dtype=torch.float64).eval()


def left_padded(prompts, pad=2):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def rows(out, prompts, P, eos):
    """Generated tokens per row, cut after the first EOS."""
    res = []
    for i in range(len(prompts)):
        g = out[i, P:].tolist()
        if eos >= 0 and eos in g:
            g = g[: g.index(eos) + 1]
        res.append(g)
    return res


def check_spec_equals_ar(model, prompts, max_new, B, eos):
    ids, mask = left_padded(prompts)
    P = ids.shape[1]
    ar, _ = model.ar_generate(ids, max_new, attention_mask=mask, eos_token_id=eos)
    ref = rows(ar, prompts, P, eos)
    # batched AR equals AR of each prompt on its own (left padding changes nothing)
    for i, p in enumerate(prompts):
        solo, _ = model.ar_generate(torch.tensor([p]), max_new, eos_token_id=eos)
        assert rows(solo, [p], len(p), eos)[0] == ref[i]
    accepted = []
    calls = [("linear_spec_generate", {}), ("linear_spec_generate", {"threshold": 0.3}),
             ("quadratic_spec_generate", {})]
    for name, kw in calls:
        out, nfe = getattr(model, name)(ids, max_new, block_length=B, attention_mask=mask, eos_token_id=eos, **kw)
        assert rows(out, prompts, P, eos) == ref, (name, kw)
        assert out.shape[1] <= P + max_new
        st = model.last_stats
        assert st.new_tokens == [len(r) for r in ref]
        assert max(st.nfe_per_row) <= nfe
        accepted += [a for r in st.accepted for a in r]
    return ref, accepted


@pytest.mark.parametrize("seed", [0, 1])
def test_self_spec_equals_ar_on_random_weights(seed):
    model = random_model(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 48, (n,), generator=g).tolist() for n in (1, 5, 9, 3)]
    _, accepted = check_spec_equals_ar(model, prompts, max_new=21, B=4, eos=-1)
    assert max(accepted) > 1   # multi-token acceptance happened (not only the bonus token)
    # with EOS stopping: rows end at different times
    ref, _ = check_spec_equals_ar(model, prompts, max_new=21, B=4, eos=5)


def test_eos_stops_rows_independently():
    model = random_model(0)
    prompts = [[3, 4, 5], [7], [9, 10, 11, 12, 13]]
    ids, mask = left_padded(prompts)
    ar, _ = model.ar_generate(ids, 30, attention_mask=mask, eos_token_id=-1)
    # pick as EOS a token some but not all rows generate, so rows stop at different steps
    gens = [set(ar[i, ids.shape[1]:].tolist()) for i in range(3)]
    cand = [t for t in range(2, 48) if 0 < sum(t in s for s in gens) < 3]
    assert cand
    ref, _ = check_spec_equals_ar(model, prompts, max_new=30, B=8, eos=cand[0])
    assert any(r[-1] == cand[0] for r in ref) and any(cand[0] not in r for r in ref)


def test_ar_nfe_and_tpf():
    model = random_model(0)
    out, nfe = model.ar_generate(torch.tensor([[3, 4, 5]]), 8, eos_token_id=-1)
    assert out.shape == (1, 11) and nfe == 8 and model.last_stats.tpf == 1.0


def test_diffusion_nfe_hand_checked():
    """B=4, 8 new tokens, no EOS: per block [seed, M, M, M].

    threshold=1.0 (nothing is that confident): one token per denoise pass -> 3 denoise + 1 KV-write
    per block -> NFE 8. threshold=0: all masks in one pass -> 1 + 1 per block -> NFE 4. The prefill
    is not counted."""
    model = random_model(0)
    ids = torch.tensor([[3, 4, 5]])
    out, nfe = model.generate(ids, 8, block_length=4, threshold=1.0, eos_token_id=-1)
    assert out.shape == (1, 11) and nfe == 8
    assert model.last_stats.accepted == [[1, 1, 1, 1, 1, 1]]
    assert (out != MASK).all()
    out, nfe = model.generate(ids, 8, block_length=4, threshold=0.0, eos_token_id=-1)
    assert nfe == 4 and model.last_stats.accepted == [[3, 3]]
    # the first token of every block is the AR seed: block 1 starts with AR's first token
    ar, _ = model.ar_generate(ids, 1, eos_token_id=-1)
    assert out[0, 3] == ar[0, 3]
    with pytest.raises(ValueError, match="multiple"):
        model.generate(ids, 6, block_length=4)


def test_diffusion_threshold_one_commits_one_per_pass_batched():
    model = random_model(1)
    ids, mask = left_padded([[3], [4, 5, 6, 7]])
    out, nfe = model.generate(ids, 16, block_length=8, threshold=1.0, attention_mask=mask, eos_token_id=-1)
    st = model.last_stats
    assert all(a == 1 for r in st.accepted for a in r) and nfe == 2 * 8
    # left padding changes nothing: each row decodes as on its own
    for i, p in enumerate([[3], [4, 5, 6, 7]]):
        solo, _ = model.generate(torch.tensor([p]), 16, block_length=8, threshold=1.0, eos_token_id=-1)
        assert solo[0, len(p):].tolist() == out[i, ids.shape[1]:].tolist()


def test_spec_nfe_hand_checked():
    """Linear: prefill 1 + 2 per cycle; quadratic: fused first pass 1 + 1 per cycle."""
    model = random_model(0)
    ids = torch.tensor([[3, 4, 5]])
    out, nfe = model.linear_spec_generate(ids, 8, block_length=4, eos_token_id=-1)
    st = model.last_stats
    assert out.shape == (1, 11) and nfe == 1 + 2 * len(st.accepted[0]) and 1 + sum(st.accepted[0]) == 8
    out, nfe = model.quadratic_spec_generate(ids, 8, block_length=4, eos_token_id=-1)
    st = model.last_stats
    assert out.shape == (1, 11) and nfe == 1 + len(st.accepted[0]) and sum(st.accepted[0]) == 8


def test_mask_id_is_never_generated():
    model = random_model(0)
    with torch.no_grad():
        model.lm_head.weight[MASK] = 10 * model.lm_head.weight[MASK] + 5  # make MASK win argmaxes
    ids = torch.tensor([[3, 4, 5]])
    for out, _ in (model.ar_generate(ids, 8, eos_token_id=-1),
                   model.generate(ids, 8, block_length=4, eos_token_id=-1),
                   model.linear_spec_generate(ids, 8, block_length=4, eos_token_id=-1),
                   model.quadratic_spec_generate(ids, 8, block_length=4, eos_token_id=-1)):
        assert (out[0, 3:] != MASK).all()


def test_sampling_is_reproducible_with_a_generator():
    model = random_model(0)
    ids = torch.tensor([[3, 4, 5]])
    a, _ = model.ar_generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b, _ = model.ar_generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# -- a trained checkpoint ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(dist1, tmp_path_factory):
    """A few joint-objective steps of the smoke recipe, saved and loaded back in float64."""
    from nld_train.inference import load_model
    from tests.test_trainer import make_trainer
    tmp = tmp_path_factory.mktemp("inf")
    tr = make_trainer(tmp, "train.max_steps=3", name="run")
    for step in range(3):
        tr.train_step(step)
    tr.step = 3
    tr.save(sync=True)
    model = load_model(tmp / "run", dtype=torch.float64)
    return tr, model


def test_loaded_checkpoint_matches_trainer_and_ar(trained):
    tr, model = trained
    assert model.dtype == torch.float64 and model.config.mask_token_id == tr.cfg.model.mask_token_id
    L = 16
    ids = torch.randint(2, tr.cfg.model.vocab_size, (2, L))
    pos = torch.arange(L)[None].expand(2, -1)
    ref = tr.model.full_logits(ids, pos, tr.model.attention_inputs("causal", L, 16, "cpu")).double()
    from nld_train.inference.masks import causal_mask
    out = model(ids, pos, causal_mask(torch.ones(2, 0, dtype=torch.bool), L))
    assert (out - ref).abs().max() < 1e-4
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    check_spec_equals_ar(model, prompts, max_new=24, B=8, eos=-1)
    # the in-memory conversion of the trainer's model (the demo hook) gives the same weights
    from nld_train.inference import from_megatron
    direct = from_megatron(tr.model, tr.cfg.model, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values(), strict=True))


def test_cli_generate_and_table(trained, capsys):
    from nld_train.inference.cli import main
    tr, _ = trained
    run = tr.cfg.run.dir
    args = [f"checkpoint={run}", "prompt=ROMEO:", "max_new_tokens=16", "block_length=8", "dtype=float64"]
    assert main(args + ["mode=all", "sol=true", "thresholds=0.9,1.0"]) == 0
    table = capsys.readouterr().out
    for mode in ("ar", "diffusion@0.9", "diffusion@1", "linear_spec", "quadratic_spec", "SOL oracle"):
        assert mode in table
    # threshold 1.0 commits exactly one token per denoise pass: TPF 1.00 (block-1 denoise + 1 KV write)
    assert [ln.split()[1] for ln in table.splitlines() if ln.startswith("diffusion@1 ")] == ["1.00"]
    spec_rows = [ln for ln in table.splitlines() if ln.startswith(("linear_spec", "quadratic_spec"))]
    assert len(spec_rows) == 2 and all(ln.split()[-2] == "1/1" for ln in spec_rows)
    # free text: the last column is the AR model's NLL per token of each mode's text; greedy
    # self-speculation wrote AR's text, so it reads the same
    ar_nll = next(ln.split()[-1] for ln in table.splitlines() if ln.startswith("ar "))
    assert "AR NLL/tok" in table and all(ln.split()[-1] == ar_nll for ln in spec_rows)
    # draft_threshold reaches the linear drafter: 1.0 fills the draft one token per pass (more
    # forwards) and, being greedy self-speculation, still prints AR's text
    runs = {}
    for extra in (["mode=ar"], ["mode=linear_spec"], ["mode=linear_spec", "draft_threshold=1.0"]):
        assert main(args + extra) == 0
        text, stats = capsys.readouterr().out.rsplit("--- mode=", 1)
        runs[" ".join(extra)] = (text, int(re.search(r"NFE=(\d+)", stats).group(1)))
    assert runs["mode=ar"][0] == runs["mode=linear_spec"][0] == runs["mode=linear_spec draft_threshold=1.0"][0]
    assert runs["mode=linear_spec draft_threshold=1.0"][1] > runs["mode=linear_spec"][1]
    assert main(args + ["mode=nope"]) == 2
    assert main(["checkpoint=/nonexistent"]) == 2


def test_spec_equals_ar_when_the_cache_is_compacted_every_cycle(monkeypatch):
    """Re-packing the cache (rows with different acceptance leave gaps) changes no token."""
    from nld_train.inference.decoding import DecodingMixin
    monkeypatch.setattr(DecodingMixin, "_maybe_compact", lambda self, cache, B: cache.compact())
    model = random_model(2)
    check_spec_equals_ar(model, [[3, 4], [5, 6, 7, 8, 9, 10, 11], [12]], max_new=17, B=4, eos=-1)


def test_eos_seed_block_counts_one_denoise_pass():
    """Issue 18 item 6: the public block-diffusion loop checks EOS after a denoise pass, so a block
    whose AR seed is already EOS costs one denoise pass + the KV-write (NFE 2), not the KV-write
    alone; the output still ends at that EOS."""
    model = random_model(seed=3)
    ids = torch.tensor([[5, 9, 11, 7]])
    seed_tok = int(model.ar_generate(ids, 1, eos_token_id=-1)[0][0, -1])
    for threshold in (0.9, None):
        out, nfe = model.generate(ids, 8, block_length=8, threshold=threshold, eos_token_id=seed_tok)
        assert out[0, ids.shape[1]:].tolist() == [seed_tok] and nfe == 2, (threshold, out, nfe)
        assert model.last_stats.nfe_per_row == [2] and model.last_stats.tpf == 0.5


def test_generate_task_table_in_both_orders(trained, capsys):
    """nld-generate mode=all task=demo_math: the task's prompts with an accuracy column; the same
    rows whichever order the modes run in (order=reversed), and a clear error without the entry
    point that supplies the tasks or for a bad order."""
    from nld_train.cli import generate_main
    from nld_train.inference.cli import main
    tr, _ = trained
    args = [f"checkpoint={tr.cfg.run.dir}", "mode=all", "task=demo_math", "limit=3", "batch_size=2",
            "max_new_tokens=16", "block_length=8", "dtype=float64", "repeats=1"]
    tables = []
    for order in ("registry", "reversed"):
        assert generate_main(args + [f"order={order}"]) == 0
        out = capsys.readouterr().out
        assert "decoding 3 prompts" in out and "accuracy" in out
        rows = [ln.split() for ln in out.splitlines()
                if ln.split() and ln.split()[0] in ("ar", "diffusion@0.9", "linear_spec", "quadratic_spec")]
        tables.append([r[:4] + r[5:] for r in rows])        # every column but tokens/s
    assert tables[0] == tables[1] and [r[0] for r in tables[0]][0] == "ar"
    assert main(args) == 2 and "entry point" in capsys.readouterr().err
    assert generate_main(args + ["order=random"]) == 2


def test_continuation_nll_equals_token_by_token_reading():
    """The table's free-text quality figure: one causal pass over prompt + continuation gives the
    same Σ -log p as feeding the tokens one at a time through the KV cache."""
    from nld_train.inference.table import continuation_nll
    model = random_model(2)
    prompt, gen = [3, 4, 5], [7, 1, 9, 9, 2]
    cache = model.new_cache(1, len(prompt) + len(gen))
    logits = model.causal_pass(torch.tensor([prompt]), cache, logits_to_keep=1)
    want = 0.0
    for t in gen:
        want -= float(torch.log_softmax(logits[0, -1].double(), -1)[t])
        logits = model.causal_pass(torch.tensor([[t]]), cache, logits_to_keep=1)
    assert abs(continuation_nll(model, prompt, gen) - want) < 1e-6 * max(1.0, abs(want))
    assert continuation_nll(model, prompt, []) == 0.0
