"""SFT data: chat formatting with an answer mask, and packed training samples.

Preparation (`nld-prepare-data` on a `messages` field) renders each conversation with a chat template
and marks the tokens of assistant turns; the mask is stored next to the tokens as a uint8 indexed
dataset `<shard>.lossmask.bin/.idx`. Training (`data.format=sft`) packs whole conversations into
rows with `SFTDataset`: every row carries the label-aligned `loss_mask`, the `document_ids` that keep
attention inside one conversation, and `position_ids` that restart at 0 for every conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nld_train.errors import DataError

# Used when the tokenizer has no chat template of its own (and no chat_template= is given):
#   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}<eos>
# Plain-text role markers (no new special tokens, so any tokenizer can encode them); an assistant
# turn ends with the tokenizer's eos token, which belongs to the answer: the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def _check_messages(messages, row: int) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"row {row}: messages must be a non-empty list of {{role, content}}, got {type(messages).__name__}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"row {row}: message {j} must be {{'role': str, 'content': str}}, got {m!r:.120}")


class ChatFormatter:
    """Token ids and an answer mask (1 = a token of an assistant turn) for a conversation.

    Works with any template that renders incrementally: the text of the first k messages followed by
    the generation prompt is a prefix of the text of the first k+1 messages, which is a prefix of the
    whole conversation. The characters between those two prefixes are the k-th (assistant) answer,
    including whatever closes the turn (an end-of-turn or eos token); a token whose first character
    lies in an answer is an answer token. Needs a fast tokenizer (character offsets).
    """

    def __init__(self, tokenizer, template: str | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: chat data needs "
                            "character offsets to mark the answer tokens")
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        if not isinstance(self.template, str):
            raise DataError("chat templates given as a dict of named templates are not supported; pass chat_template=<file>")
        self.eos = tokenizer.eos_token_id

    def _render(self, conversations: list, generation_prompt: bool) -> list[str]:
        return self.tokenizer.apply_chat_template(conversations, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode_batch(self, conversations: Sequence, first_row: int = 0) -> list[tuple[list[int], list[int]]]:
        """[(ids, answer_mask)] per conversation; the ids end with eos (appended if the template does not)."""
        for i, messages in enumerate(conversations):
            _check_messages(messages, first_row + i)
        conversations = [[{"role": m["role"], "content": m["content"]} for m in c] for c in conversations]
        full = self._render(conversations, False)
        # every assistant turn k: render messages[:k] + generation prompt and messages[:k + 1]
        prompts, answers, owner = [], [], []
        for i, conv in enumerate(conversations):
            for k, m in enumerate(conv):
                if m["role"] == "assistant":
                    prompts.append(conv[:k])
                    answers.append(conv[: k + 1])
                    owner.append(i)
        spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
        if owner:
            # a conversation that opens with an answer has an empty prompt: render "" for it
            nonempty = [j for j, p in enumerate(prompts) if p]
            rendered = self._render([prompts[j] for j in nonempty], True) if nonempty else []
            before = [""] * len(prompts)
            for j, text in zip(nonempty, rendered, strict=True):
                before[j] = text
            after = self._render(answers, False)
            for j, i in enumerate(owner):
                a, b = len(before[j]), len(after[j])
                if not (after[j].startswith(before[j]) and full[i].startswith(after[j])):
                    raise DataError(
                        f"row {first_row + i}: the chat template does not render incrementally (the prompt "
                        "text is not a prefix of the conversation text), so the answer tokens cannot be found; "
                        "pass another chat_template=<file>")
                spans[i].append((a, b))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False)
        out = []
        for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
            starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
            mask = np.zeros(len(ids), dtype=np.uint8)
            for a, b in spans[i]:
                mask[(starts >= a) & (starts < b)] = 1
            ids, mask = list(ids), mask.tolist()
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)
                mask.append(1 if conversations[i][-1]["role"] == "assistant" else 0)
            out.append((ids, mask))
        return out


# ---------------------------------------------------------------------------------- training rows


class SFTDataset:
    """Packed SFT rows over nld-prepare-data chat shards (tokens + `.lossmask`).

    Conversations of the chosen split are shuffled per epoch (seed, epoch) and packed greedily in
    that order: a conversation starts at a multiple of `align` (the diffusion block size, so each
    conversation's blocks are the blocks it would have alone) and is never split across rows; one
    longer than the row is cut (counted in `truncated`). The rest of a row is `pad` tokens with
    document id -1, no loss, never noised. Row i is a pure function of (data, split, seed, L, align,
    i), like the GPTDataset sample index, so resumes and any parallel layout see the same rows.

    `__getitem__` gives tokens, labels (tokens shifted by one), the label-aligned loss_mask (the
    target is an answer token of the same conversation), document_ids and position_ids, all [L].
    """

    def __init__(self, prefixes: Sequence[str], split: str, split_index: int, num_samples: int,
                 seq_length: int, seed: int, pad_id: int, align: int = 1, pack: bool = True):
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from nld_train.data.indexed import LOSS_MASK_SUFFIX

        if align < 1 or seq_length % align:
            raise DataError(f"seq_length {seq_length} must be a multiple of the packing alignment {align}")
        self.seq_length, self.pad_id, self.align, self.pack = seq_length, pad_id, align, pack
        self.tokens = [IndexedDataset(p) for p in prefixes]
        self.masks = [IndexedDataset(p + LOSS_MASK_SUFFIX) for p in prefixes]
        bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[split_index]
        # the split cuts each shard's conversations like megatron cuts documents
        dataset_ids, doc_ids, lengths = [], [], []
        for d, ds in enumerate(self.tokens):
            n = len(ds)
            if bounds is not None:
                lo, hi = int(round(bounds[0] * n)), int(round(bounds[1] * n))
                dataset_ids.append(np.full(hi - lo, d, dtype=np.int32))
                doc_ids.append(np.arange(lo, hi, dtype=np.int64))
                lengths.append(np.asarray(ds.sequence_lengths[lo:hi], dtype=np.int64))
        self.dataset_of = np.concatenate(dataset_ids) if dataset_ids else np.zeros(0, np.int32)
        self.doc_of = np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64)
        if len(self.doc_of) == 0:
            name = ("train", "valid", "test")[split_index]
            raise DataError(f"split {split!r} leaves no {name} conversations in {list(prefixes)}")
        self.lengths = np.concatenate(lengths)
        self.seed = int(seed)
        self.truncated = int(np.count_nonzero(self.lengths > seq_length + 1))  # conversations cut to fit a row
        # rows as [start, end) into `order`, the concatenated per-epoch permutations
        self.order = np.zeros(0, dtype=np.int64)
        self.row_starts: list[int] = []
        self.epochs = 0
        while len(self.row_starts) < num_samples:
            self._pack_epoch()
        self.row_starts = self.row_starts[: num_samples + 1]
        self.num_samples = int(num_samples)

    def _pack_epoch(self) -> None:
        perm = np.random.default_rng([self.seed, self.epochs]).permutation(len(self.lengths))
        base, cap = len(self.order), self.seq_length + 1  # a row holds L + 1 tokens: L inputs, L labels
        used = cap  # forces a new row for the first conversation
        for j, c in enumerate(perm):
            n = min(int(self.lengths[c]), cap)
            start = -(-used // self.align) * self.align
            if not self.pack or start + n > cap:
                self.row_starts.append(base + j)
                start = 0
            used = start + n
        self.order = np.concatenate([self.order, perm])
        self.epochs += 1
        self._sentinel = len(self.order)

    def __len__(self) -> int:
        return self.num_samples

    def conversations(self, idx: int) -> np.ndarray:
        """Indices (into this split) of the conversations packed into row `idx`."""
        start = self.row_starts[idx]
        end = self.row_starts[idx + 1] if idx + 1 < len(self.row_starts) else self._sentinel
        return self.order[start:end]

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"row {idx} outside [0, {self.num_samples})")
        cap = self.seq_length + 1
        ids = np.full(cap, self.pad_id, dtype=np.int64)
        answer = np.zeros(cap, dtype=bool)
        docs = np.full(cap, -1, dtype=np.int64)
        pos = np.zeros(cap, dtype=np.int64)
        used = 0
        for k, c in enumerate(self.conversations(idx)):
            d, i = int(self.dataset_of[c]), int(self.doc_of[c])
            start = -(-used // self.align) * self.align
            n = min(int(self.lengths[c]), cap - start)
            ids[start:start + n] = self.tokens[d][i][:n]
            answer[start:start + n] = self.masks[d][i][:n] != 0
            docs[start:start + n] = k
            pos[start:start + n] = np.arange(n)
            used = start + n
        pad = docs == -1
        pos[pad] = np.arange(cap)[pad] % self.seq_length  # any valid position: pads see only pads
        # label-aligned: predicting ids[t + 1] from t counts iff it is an answer token of the same conversation
        loss_mask = answer[1:] & (docs[1:] == docs[:-1]) & (docs[1:] >= 0)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": loss_mask.astype(np.float32),
                "document_ids": docs[:-1], "position_ids": pos[:-1]}


def build_sft_datasets(prefixes: Sequence[str], seq_length: int, num_train_samples: int, num_valid_samples: int,
                       seed: int, split: str, pad_id: int, align: int, pack: bool):
    """(train, valid or None) SFTDatasets; the valid rows come from held-out conversations."""
    train = SFTDataset(prefixes, split, 0, num_train_samples, seq_length, seed, pad_id, align, pack)
    valid = (SFTDataset(prefixes, split, 1, num_valid_samples, seq_length, seed, pad_id, align, pack)
             if num_valid_samples > 0 else None)
    return train, valid
