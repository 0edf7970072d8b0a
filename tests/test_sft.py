"""SFT: chat formatting with answer masks, packed rows, and the loss mask through both objectives.

Prompt tokens get no AR loss and no diffusion loss and are never noised; packed conversations do
not see each other (dense and FlexAttention masks from one predicate) and give the same logits as
each conversation alone.
"""
import numpy as np
import pytest
import torch

from nld_train.data.indexed import LOSS_MASK_SUFFIX, IndexedWriter
from nld_train.data.sft import DEFAULT_CHAT_TEMPLATE, ChatFormatter, SFTDataset
from nld_train.data.tokenizer import DEMO_TOKENIZER, load_tokenizer
from nld_train.errors import DataError
from nld_train.objective import ARObjective, JointObjective, packed_attention_mask, packed_mask_mod
from nld_train.objective.masks import joint_allowed

PAD, EOS = 2, 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_TOKENIZER)


def conversation(i):
    msgs = [{"role": "user", "content": f"question {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."}]
    if i % 2:
        msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
            {"role": "user", "content": "And times two?"}, {"role": "assistant", "content": f"{4 * i}, sir."}]
    return msgs


def test_chat_formatter_marks_exactly_the_answers(tok):
    fmt = ChatFormatter(tok)
    assert fmt.template == DEFAULT_CHAT_TEMPLATE  # the demo tokenizer has no template of its own
    convs = [conversation(i) for i in range(6)]
    for conv, (ids, mask) in zip(convs, fmt.encode_batch(convs), strict=True):
        assert len(ids) == len(mask) and ids[-1] == EOS and mask[-1] == 1
        text = tok.decode(ids, skip_special_tokens=False)
        assert text == tok.apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
        answers = [m["content"] + "<|endoftext|>" for m in conv if m["role"] == "assistant"]
        # the answer tokens, run by run, decode to the assistant turns (with the eos that ends each)
        runs, cur = [], []
        for t, m in zip(ids, mask, strict=True):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs.append(cur)
        assert [tok.decode(r, skip_special_tokens=False) for r in runs if r] == answers
    with pytest.raises(DataError, match="row 3: message 0"):
        fmt.encode_batch([[{"role": "user"}]], first_row=3)


def write_sft_shard(prefix, convs):
    """Conversations [(ids, answer_mask)] -> tokens + .lossmask shards (as nld-prepare-data writes them)."""
    with IndexedWriter(prefix, np.uint16) as tw, IndexedWriter(prefix + LOSS_MASK_SUFFIX, np.uint8) as mw:
        lengths = [len(ids) for ids, _ in convs]
        tw.add_documents(np.concatenate([ids for ids, _ in convs]), lengths)
        mw.add_documents(np.concatenate([m for _, m in convs]), lengths)
        mw.commit()
        tw.commit()
    return prefix


def synthetic(n, seed=0, lo=5, hi=40):
    """Conversations whose token ids encode (conversation, position) and whose answer is the second half."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n):
        length = int(rng.integers(lo, hi))
        ids = 3 + (np.arange(length) + 50 * c) % 8000
        ids[-1] = EOS
        mask = (np.arange(length) >= length // 2).astype(np.uint8)
        out.append((ids, mask))
    return out


def test_packed_rows(tmp_path):
    convs = synthetic(40)
    prefix = write_sft_shard(str(tmp_path / "sft"), convs)
    L, align = 64, 8
    ds = SFTDataset([prefix], "100,0,0", 0, 30, L, seed=5, pad_id=PAD, align=align)
    assert len(ds) == 30 and ds.epochs >= 2  # 40 conversations fill fewer than 30 rows: several epochs
    seen = []
    for r in range(len(ds)):
        row = ds[r]
        tokens, labels, lm = row["tokens"], row["labels"], row["loss_mask"]
        docs, pos = row["document_ids"], row["position_ids"]
        assert tokens.shape == labels.shape == lm.shape == docs.shape == pos.shape == (L,)
        assert np.array_equal(labels[:-1], tokens[1:])
        assert docs[0] == 0  # every row starts with a whole conversation
        for k, c in enumerate(ds.conversations(r)):
            where = np.flatnonzero(docs == k)
            start = where[0]
            assert start % align == 0 and np.array_equal(where, np.arange(start, start + len(where)))
            ids, mask = convs[c]
            n = len(where)
            assert np.array_equal(tokens[where], ids[:n]) and np.array_equal(pos[where], np.arange(n))
            # label-aligned: token t's target t+1 counts iff it is an answer token of this conversation
            targets_in_doc = where[where + 1 < start + len(ids)]
            targets_in_doc = targets_in_doc[targets_in_doc + 1 <= L - 1 + 1]
            assert np.array_equal(lm[targets_in_doc], mask[1:len(targets_in_doc) + 1].astype(np.float32))
            seen.append(c)
        assert lm[docs == -1].sum() == 0 and np.all(tokens[docs == -1] == PAD)
        # no loss where the target lies in another conversation or in padding
        boundary = np.flatnonzero(np.diff(docs) != 0)
        assert lm[boundary].sum() == 0
    assert set(seen) == set(range(40))  # every conversation is used, whole
    again = SFTDataset([prefix], "100,0,0", 0, 30, L, seed=5, pad_id=PAD, align=align)
    assert all(np.array_equal(ds[i]["tokens"], again[i]["tokens"]) for i in (0, 7, 29))
    other = SFTDataset([prefix], "100,0,0", 0, 30, L, seed=6, pad_id=PAD, align=align)
    assert not np.array_equal(ds[0]["tokens"], other[0]["tokens"])
    single = SFTDataset([prefix], "100,0,0", 0, 10, L, seed=5, pad_id=PAD, align=align, pack=False)
    assert all(len(single.conversations(i)) == 1 for i in range(10))
    with pytest.raises(DataError, match="no valid conversations"):
        SFTDataset([prefix], "100,0,0", 1, 4, L, seed=5, pad_id=PAD)


def test_truncated_conversation_counts_and_stays_consistent(tmp_path):
    prefix = write_sft_shard(str(tmp_path / "long"), synthetic(3, lo=100, hi=120))
    ds = SFTDataset([prefix], "100,0,0", 0, 3, 32, seed=0, pad_id=PAD, align=8)
    assert ds.truncated == 3
    row = ds[0]
    assert np.all(row["document_ids"] == 0) and np.array_equal(row["position_ids"], np.arange(32))


def sft_batch(b=3, L=32, seed=0):
    """A batch with prompts, answers and two conversations per row, as SFTDataset builds them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 900, (b, L + 1), generator=g)
    answer = torch.zeros(b, L + 1, dtype=torch.bool)
    docs = torch.full((b, L + 1), -1)
    for r in range(b):
        docs[r, :12], docs[r, 16:28] = 0, 1
        answer[r, 6:12], answer[r, 22:28] = True, True
    lm = (answer[:, 1:] & (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)).float()
    pos = torch.zeros(b, L + 1, dtype=torch.long)
    pos[:, :12], pos[:, 16:28] = torch.arange(12), torch.arange(12)
    return tokens[:, :-1], tokens[:, 1:], lm, docs[:, :-1], pos[:, :-1], answer[:, :-1]


def test_prompt_tokens_are_never_noised_and_carry_no_loss():
    tokens, labels, lm, docs, pos, answer = sft_batch()
    L = tokens.shape[1]
    obj = JointObjective(mask_token_id=1, block_size=8, alpha=0.3)
    hits = torch.zeros_like(answer)
    for start in range(0, 400, 3):  # many noise draws, including heavily masked rows
        prep = obj.prepare(tokens, labels, lm, list(range(start, start + 3)), docs, pos)
        assert not (prep.masked & ~answer).any(), "a prompt or padding token was noised"
        hits |= prep.masked
        assert torch.equal(prep.input_ids[:, :L][~answer], tokens[~answer])
        assert prep.n_ar == lm.sum()  # the AR count is the answer-target count, nothing else
        # huge CE on every position that is not an answer: neither loss may change
        ce = torch.rand(3, 2 * L)
        poison = ce.clone()
        poison[:, :L][~answer] = 1e6          # noisy half: prompt / padding positions
        poison[:, L:][lm == 0] = float("inf")  # clean half: non-answer targets
        assert all(torch.equal(a, b) for a, b in zip(obj.sums(ce, prep), obj.sums(poison, prep), strict=True))
    assert torch.equal(hits, answer)  # ... while every answer token does get noised sometimes
    ar = ARObjective()
    prep = ar.prepare(tokens, labels, lm, [0, 1, 2], docs, pos)
    ce = torch.rand(3, L)
    poison = torch.where(lm == 0, torch.full_like(ce, float("inf")), ce)
    assert torch.equal(ar.sums(ce, prep)[0], ar.sums(poison, prep)[0]) and prep.n_ar == lm.sum()
    assert torch.equal(prep.position_ids, pos)
    joint = obj.prepare(tokens, labels, lm, [0, 1, 2], docs, pos)
    assert torch.equal(joint.position_ids, torch.cat([pos, pos], 1))


def brute_packed(kind, docs, B):
    b, L = docs.shape
    S = 2 * L if kind == "joint" else L
    out = torch.zeros(b, S, S, dtype=torch.bool)
    for r in range(b):
        for q in range(S):
            for k in range(S):
                same = docs[r, q % L] == docs[r, k % L]
                if kind == "joint":
                    base = bool(joint_allowed(torch.tensor(q), torch.tensor(k), L, B))
                else:
                    base = q >= k
                out[r, q, k] = base and bool(same)
    return out


@pytest.mark.parametrize("kind", ["causal", "joint"])
def test_packed_masks_dense_and_flex_share_the_predicate(kind):
    from torch.nn.attention.flex_attention import create_mask
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 1, 1]])
    dense = packed_attention_mask(kind, docs, 4)
    assert torch.equal(dense, brute_packed(kind, docs, 4))
    S = dense.shape[-1]
    flex = create_mask(packed_mask_mod(kind, docs, 4), 2, None, S, S, device="cpu")
    assert torch.equal(flex[:, 0], dense)
    # one document per row is the plain layout mask
    from nld_train.objective import causal_attention_mask, joint_attention_mask
    plain = joint_attention_mask(8, 4) if kind == "joint" else causal_attention_mask(8)
    assert torch.equal(packed_attention_mask(kind, torch.zeros(1, 8, dtype=torch.long), 4)[0], plain)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["causal", "joint"])
def test_packed_conversations_equal_each_conversation_alone(dist1, kind):
    """Block-aligned packing + document masks + per-document positions: a conversation's logits in
    a packed row are its logits alone in a row (both halves for the joint layout)."""
    from tests.test_model import build
    model, m = build(dist1)
    B, L = 8, 48
    n_a, n_b = 13, 21
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 900, (n_a,), generator=g), torch.randint(3, 900, (n_b,), generator=g)
    off = 16  # a multiple of B after n_a
    row = torch.full((L,), PAD)
    row[:n_a], row[off:off + n_b] = a, b
    docs = torch.full((L,), -1)
    docs[:n_a], docs[off:off + n_b] = 0, 1
    pos = torch.arange(L) % L
    pos[:n_a], pos[off:off + n_b] = torch.arange(n_a), torch.arange(n_b)

    def logits(ids, d, p):
        if kind == "joint":  # noisy copy: every third token of each conversation masked
            noisy = torch.where(p % 3 == 0, torch.full_like(ids, 1), ids)
            ids, p = torch.cat([noisy, ids]), torch.cat([p, p])
        attn = model.packed_attention_inputs(kind, d[None], p[None], B)
        return model.full_logits(ids[None], p[None], attn)[0]

    def halves(x, n, start, length):
        parts = [x[start:start + length]]
        if kind == "joint":
            parts.append(x[n + start:n + start + length])
        return torch.cat(parts)

    packed = logits(row, docs, pos)
    for conv, start in ((a, 0), (b, off)):
        n = len(conv)
        Lc = -(-n // B) * B
        alone_ids = torch.full((Lc,), PAD)
        alone_ids[:n] = conv
        alone_docs = torch.full((Lc,), -1)
        alone_docs[:n] = 0
        alone_pos = torch.arange(Lc)
        alone = logits(alone_ids, alone_docs, alone_pos)
        diff = (halves(packed, L, start, n) - halves(alone, Lc, 0, n)).abs().max()
        assert diff < 1e-4, diff


@torch.no_grad()
def test_packed_flex_equals_dense_in_the_model(dist1):
    from nld_train.model.attention import build_packed_attention_inputs
    from tests.test_model import build
    model, m = build(dist1)
    L, B = 32, 8
    docs = torch.tensor([[0] * 10 + [-1] * 6 + [1] * 16, [0] * 24 + [1] * 8])
    ids = torch.randint(0, m.vocab_size, (2, 2 * L))
    pos = torch.cat([torch.arange(L), torch.arange(L)])[None].expand(2, -1)
    dense = model.full_logits(ids, pos, build_packed_attention_inputs("joint", docs, B, "sdpa"))
    flex = model.full_logits(ids, pos, build_packed_attention_inputs("joint", docs, B, "flex"))
    assert (dense - flex).abs().max() < 1e-4
