"""FlexAttention under torch.compile: a fall-back to eager (past dynamo's recompile limit) is an
error, never a silent switch to the unfused path; the compiled packed BlockMask builder gives the
same mask as the eager one. On CPU both compile with dynamo's "eager" backend (traced by dynamo,
no code generation), which exercises exactly the dynamo decisions that CUDA's inductor sees."""
import pytest
import torch
import torch.nn.functional as F

from nld_train.model.attention import (
    FlexNotCompiledError,
    _compiled_flex,
    attend,
    build_attention_inputs,
    build_packed_attention_inputs,
)
from nld_train.objective.masks import joint_attention_mask, packed_attention_mask


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 2 * L, 16, generator=g), torch.randn(1, 2, 2 * L, 16, generator=g),
            torch.randn(1, 2, 2 * L, 16, generator=g))


def test_compiled_flex_matches_dense_within_the_recompile_limit(fresh_dynamo):
    flex = _compiled_flex("eager")
    for L in (32, 64):  # two graphs, well inside the default limit of 8: no false alarm
        q, k, v = _qkv(L)
        spec = build_attention_inputs("joint", L, 16, "flex", "cpu")
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_attention_mask(L, 16), enable_gqa=True)
        torch.testing.assert_close(flex(q, k, v, spec.block_mask, None), ref, atol=1e-5, rtol=1e-5)


def test_flex_past_the_recompile_limit_fails_loudly(fresh_dynamo):
    """recompile_limit=1: the second shape would need a second graph, dynamo gives up and runs the
    frame eagerly, i.e. FlexAttention would run unfused. That must raise (the detector), not run."""
    flex = _compiled_flex("eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        q, k, v = _qkv(32)
        flex(q, k, v, build_attention_inputs("joint", 32, 16, "flex", "cpu").block_mask, None)  # graph 1
        q, k, v = _qkv(64)
        spec = build_attention_inputs("joint", 64, 16, "flex", "cpu")
        with pytest.raises(FlexNotCompiledError, match="recompile_limit"):
            flex(q, k, v, spec.block_mask, None)
    torch._dynamo.reset()  # per case, as scripts/bench/attention.py does: a fresh budget compiles again
    with torch._dynamo.config.patch(recompile_limit=1):
        flex(q, k, v, spec.block_mask, None)


def test_new_packed_mask_per_micro_batch_needs_no_new_graph(fresh_dynamo):
    """Packed SFT builds a new BlockMask (a new mask_mod closure over new document ids) for every
    micro-batch: neither the compiled builder nor compiled flex may recompile for it, or training
    would reach the recompile limit (and FlexNotCompiledError) after a few micro-batches."""
    flex = _compiled_flex("eager")
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(4):
            docs = torch.cumsum(torch.rand(2, 64, generator=g) < 0.1, 1)
            spec = build_packed_attention_inputs("joint", docs, 16, "flex", compile_mask="eager")
            q, kv = torch.randn(2, 4, 128, 16, generator=g), torch.randn(2, 2, 128, 16, generator=g)
            ref = F.scaled_dot_product_attention(q, kv, kv, attn_mask=packed_attention_mask("joint", docs, 16)[:, None],
                                                 enable_gqa=True)
            torch.testing.assert_close(flex(q, kv, kv, spec.block_mask, None), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attend_refuses_eager_flex_on_cuda():
    q, k, v = (t.cuda() for t in _qkv(32))
    spec = build_attention_inputs("joint", 32, 16, "flex", "cuda")
    with pytest.raises(FlexNotCompiledError, match="must run compiled"):
        attend(q, k, v, spec, compiled_flex=False)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_attention_mask(32, 16, "cuda"), enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, spec, compiled_flex=True), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["causal", "joint"])
def test_compiled_packed_block_mask_equals_eager(kind, fresh_dynamo):
    g = torch.Generator().manual_seed(1)
    L, bs = 256, 16
    # documents of random lengths per row (ids ascending, as the packer writes them)
    docs = torch.cumsum(torch.rand(3, L, generator=g) < 0.03, dim=1)
    eager = build_packed_attention_inputs(kind, docs, bs, "flex", compile_mask=None).block_mask
    compiled = build_packed_attention_inputs(kind, docs, bs, "flex", compile_mask="eager").block_mask
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(eager, name), getattr(compiled, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert torch.equal(compiled.to_dense(), eager.to_dense())
    # and the mask itself is the dense predicate's (tile level: any allowed pair in a tile)
    s = compiled.shape[-1]
    dense = packed_attention_mask(kind, docs, bs)
    t = compiled.BLOCK_SIZE[0]
    tiles = dense.view(3, s // t, t, s // t, t).any(4).any(2)
    assert torch.equal(compiled.to_dense()[:, 0].bool(), tiles)
    # a second micro-batch with other documents: same graph, its own mask
    docs2 = torch.cumsum(torch.rand(3, L, generator=g) < 0.1, dim=1)
    again = build_packed_attention_inputs(kind, docs2, bs, "flex", compile_mask="eager").block_mask
    assert torch.equal(again.to_dense(), build_packed_attention_inputs(kind, docs2, bs, "flex",
                                                                       compile_mask=None).block_mask.to_dense())
    assert not torch.equal(again.to_dense(), compiled.to_dense())


# -- scripts/bench/attention.py: a fresh recompile budget per case, out-of-memory per case ----------
def test_attention_bench_resets_dynamo_per_case(tmp_path, monkeypatch, fresh_dynamo):
    """Two cases with compiled flex (dynamo's eager backend) under recompile_limit=1: each case
    needs its own graph, so only the per-case reset keeps the second one compiled."""
    import nld_train.model.attention as attention
    from tests.test_bench import _module
    att = _module("attention")
    monkeypatch.setattr(attention, "_compiled_flex", lambda: _compiled_flex("eager"))
    out = tmp_path / "att.json"
    with torch._dynamo.config.patch(recompile_limit=1):
        assert att.main(["--seq-length", "32", "64", "--block-size", "16", "--backends", "flex", "--compile-flex",
                         "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    import json
    rows = [r for r in json.loads(out.read_text())["results"] if r["backend"] == "flex (compiled)"]
    assert [r["seq_length"] for r in rows] == [32, 64] and all(r["ok"] for r in rows)


def test_attention_bench_reports_out_of_memory_and_goes_on(tmp_path, monkeypatch, capsys):
    import json

    import nld_train.model.attention as attention
    from tests.test_bench import _module
    att = _module("attention")
    real = attention.attend
    writes = []

    def attend(q, k, v, spec, *a, **kw):  # the masked-SDPA backend runs out of memory at L = 64
        if spec.dense is not None and q.shape[2] == 128:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(q, k, v, spec, *a, **kw)
    monkeypatch.setattr(attention, "attend", attend)
    real_write = att.C.write_json
    monkeypatch.setattr(att.C, "write_json", lambda p, payload: (writes.append(json.loads(json.dumps(payload))),
                                                                 real_write(p, payload)))
    out = tmp_path / "att.json"
    assert att.main(["--seq-length", "32", "64", "--block-size", "16", "--backends", "dense", "sdpa",
                     "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    assert "out of memory" in capsys.readouterr().out
    rows = {(r["seq_length"], r["backend"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[(64, "sdpa")]["status"] == "out of memory" and rows[(64, "sdpa")]["fwd_s"] is None
    assert rows[(32, "sdpa")]["status"] == "ok" and rows[(32, "sdpa")]["ok"]
    assert rows[(64, "dense")]["status"] == "ok" and rows[(64, "dense")]["fwd_s"] > 0
    # written as results arrive: after each case, then once complete
    assert [(len(w["results"]), w["complete"]) for w in writes] == [(3, False), (6, False), (6, True)]

    # the high-precision reference itself out of memory: the case's rows say so, the AR row still runs
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, *a, **kw):
        if q.dtype == torch.float64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sdpa(q, *a, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    assert att.main(["--seq-length", "32", "--block-size", "16", "--backends", "dense", "sdpa",
                     "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["dense"]["status"] == rows["sdpa"]["status"] == "skipped: the dense reference ran out of memory"
    assert rows["causal(L) = AR attention"]["status"] == "ok" and rows["causal(L) = AR attention"]["fwd_s"] > 0
