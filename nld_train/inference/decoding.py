"""The four decoding modes (spec §3.1, §3.2, §3.4, §3.5) over one set of weights.

All modes share three forward kinds over one :class:`KVCache` (spec §3.0): a *causal* pass
(prefill, AR step, verify, block KV-write), a *bidirectional block* pass that does not touch the
cache (denoise / draft), and *crop* (drop rejected drafts). Batches are left-padded; every row has
its own logical cache length (= position of its next token), so rows that accept different numbers
of draft tokens simply keep different slots (see :class:`KVCache`).

Conventions shared by all modes:
- ``out_ids`` = prompt (as given, with its left padding) + generated tokens; rows are padded to the
  same length with EOS, and nothing after a row's first EOS is kept.
- ``nfe`` = forward passes of the batch, counted per spec (AR and self-spec count the prefill,
  block diffusion does not). Per-row counts and acceptance lengths go to ``model.last_stats``.
- The mask id is never a candidate (its logit is removed before every argmax / sample).
- ``eos_token_id=None`` uses the model's EOS (``config.eos_token_id``); a negative value disables
  stopping at EOS.
- Greedy by default. With ``temperature > 0`` tokens are sampled (top-p, optional generator);
  self-speculation then accepts drafts that equal the verifier's samples, as the public code does
  (not distribution-exact speculative sampling).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from nld_train.inference import masks as M
from nld_train.inference.model import KVCache, NLDModel
from nld_train.inference.policies import CommitPolicy, EvenSplitPolicy, ThresholdPolicy
from nld_train.inference.sampler import LearnedSamplerPolicy, as_sampler
from nld_train.lora import as_adapter


# -- statistics ------------------------------------------------------------------------------------
@dataclass
class DecodeStats:
    mode: str
    nfe: int = 0                                        # forward passes of the whole batch
    nfe_per_row: List[int] = field(default_factory=list)  # passes until the row's last token was fixed
    new_tokens: List[int] = field(default_factory=list)   # generated tokens per row (EOS included)
    # tokens committed per draft pass (diffusion: per denoise pass; self-spec: per cycle), per row
    accepted: List[List[int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tpf(self) -> float:
        """Tokens per forward: total generated tokens / total per-row NFE (= tokens/NFE at batch 1)."""
        return sum(self.new_tokens) / max(sum(self.nfe_per_row), 1)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / max(self.seconds, 1e-9)

    @property
    def mean_accepted(self) -> float:
        flat = [a for row in self.accepted for a in row]
        return sum(flat) / max(len(flat), 1)


# -- LoRA drafter (spec §3.6) ---------------------------------------------------------------------
def _uses_lora(fn):
    """``lora=`` (None, a LoRA adapter or its folder): the adapter is attached for the call and is
    active only in draft passes (``block_pass``; the quadratic decoder gates it per token), never in the
    causal prefill / verify / KV-write passes, so the verifier stays the plain model."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        if kw.get("lora") is None or kw.get("lora") is False:
            return fn(self, *args, **kw)
        adapter = as_adapter(kw["lora"], self)
        with adapter.attached(self):
            self._use_lora(adapter)
            try:
                return fn(self, *args, **kw)
            finally:
                self._use_lora(None)
    return wrapper


# -- the mixin -----------------------------------------------------------------------------------
def _left_padded(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(valid.shape)} does not match input_ids {tuple(input_ids.shape)}")
    # left padding only: once a row starts, it has no holes (a right-padded batch would put pads
    # between the prompt and the generated tokens)
    if (valid[:, 1:] < valid[:, :-1]).any():
        raise ValueError("batches must be LEFT-padded (attention_mask = 0...0 1...1 per row)")
    if not valid[:, -1].all():
        raise ValueError("every row needs at least one prompt token")
    return input_ids, valid


class DecodingMixin:
    """``ar_generate``, ``generate``, ``linear_spec_generate``, ``quadratic_spec_generate``."""

    last_stats: Optional[DecodeStats] = None
    _lora = None          # the LoRA adapter attached for the current call (see _uses_lora)

    def _use_lora(self, adapter) -> None:
        # a plain attribute: nn.Module.__setattr__ would register the adapter as a submodule (state_dict)
        object.__setattr__(self, "_lora", adapter)

    def _lora_gate(self, gate) -> None:
        if self._lora is not None:
            self._lora.gate = gate

    # -- shared helpers ---------------------------------------------------------------------------
    def _eos(self, eos_token_id) -> Optional[int]:
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        return None if eos_token_id is None or eos_token_id < 0 else int(eos_token_id)

    def causal_pass(self, ids, cache: KVCache, new_valid=None, update=True, logits_to_keep=0):
        """Causal pass of new tokens over the cache; commits them when ``update``."""
        b, s = ids.shape
        self._lora_gate(None)
        start = cache.lengths()[:, None]
        steps = torch.arange(s, device=ids.device)[None] if new_valid is None else \
            (new_valid.long().cumsum(1) - 1).clamp(min=0)
        mask = M.causal_mask(cache.key_valid(), s, new_valid)
        logits = self(ids, start + steps, mask, cache, update_cache=False, logits_to_keep=logits_to_keep)
        if update:
            cache.commit(s, valid=new_valid)
        return logits

    def block_pass(self, ids, cache: KVCache):
        """Bidirectional pass of one block over the cache; the cache is not updated."""
        s = ids.shape[1]
        self._lora_gate(True)
        pos = cache.lengths()[:, None] + torch.arange(s, device=ids.device)[None]
        return self(ids, pos, M.block_mask(cache.key_valid(), s), cache, update_cache=False)

    def pick_tokens(self, logits, temperature=0.0, top_p=1.0, generator=None):
        """Candidate tokens (argmax, or a top-p sample); the mask id can never be chosen."""
        logits = logits.clone()
        logits[..., self.config.mask_token_id] = float("-inf")
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.double() / temperature, -1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p   # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])

    @staticmethod
    def confidence(logits, tokens):
        """Softmax probability of the candidate over the full vocabulary (as SGLang: the mask id is
        excluded from the argmax, not from the softmax)."""
        return torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, -1) \
            .gather(-1, tokens[..., None])[..., 0]

    def _finish(self, input_ids, gen, n_new, eos, stats: DecodeStats, t0):
        """prompt + generated, rows padded with EOS up to the longest row."""
        width = int(n_new.max()) if n_new.numel() else 0
        fill = eos if eos is not None else 0
        cols = torch.arange(width, device=gen.device)[None]
        gen = torch.where(cols < n_new[:, None], gen[:, :width], torch.full_like(gen[:, :width], fill))
        stats.new_tokens = n_new.tolist()
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return torch.cat([input_ids, gen], 1), stats.nfe

    def _accept(self, stats, gen, n_new, done, ar, drafts, emitted, eos, max_new_tokens):
        """Self-speculation's acceptance (shared by linear and quadratic): ``a`` = 1 + the longest
        prefix where the AR prediction equals the next draft token; emit ``emitted[:, :a]`` within
        the budget, cut at EOS. Returns (a, n_new, done)."""
        a = (ar[:, :-1] == drafts[:, 1:]).long().cumprod(1).sum(1) + 1
        take = torch.minimum(a, max_new_tokens - n_new).clamp(min=0)
        take, hit = self._cut_at_eos(emitted, take, eos)
        take = torch.where(done, 0, take)
        for r in (~done).nonzero()[:, 0].tolist():
            stats.accepted[r].append(int(take[r]))
        n_new = self._emit(gen, n_new, emitted, take)
        return a, n_new, done | hit | (n_new >= max_new_tokens)

    @staticmethod
    def _cut_at_eos(tokens, take, eos):
        """Number of tokens to keep per row: ``take`` capped after the first EOS; and whether one hit."""
        if eos is None or tokens.shape[1] == 0:
            return take, torch.zeros_like(take, dtype=torch.bool)
        j = torch.arange(tokens.shape[1], device=tokens.device)[None]
        is_eos = (tokens == eos) & (j < take[:, None])
        first = torch.where(is_eos, j, tokens.shape[1]).min(1).values
        hit = is_eos.any(1)
        return torch.where(hit, first + 1, take), hit

    @staticmethod
    def _emit(gen, n_new, tokens, take):
        """Append ``tokens[r, :take[r]]`` to row r of ``gen`` at column ``n_new[r]``."""
        b, s = tokens.shape
        j = torch.arange(s, device=tokens.device)[None]
        cols = (n_new[:, None] + j).clamp(max=gen.shape[1] - 1)
        keep = j < take[:, None]
        gen.scatter_(1, cols, torch.where(keep, tokens, gen.gather(1, cols)))
        return n_new + take

    def _maybe_compact(self, cache: KVCache, block_length: int):
        # rows with different acceptance leave gaps; re-pack when they waste more than they keep
        if cache.slots > 2 * int(cache.lengths().max()) + block_length:
            cache.compact()

    # -- 3.1 AR ------------------------------------------------------------------------------------
    @torch.no_grad()
    def ar_generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_p=1.0,
                    eos_token_id=None, generator=None):
        """Autoregressive decoding. NFE = forward passes; the prefill is the first one, so a row that
        generates n tokens without stopping costs n passes (TPF = 1)."""
        t0 = time.perf_counter()
        input_ids, valid = _left_padded(input_ids.to(self.device), attention_mask)
        eos = self._eos(eos_token_id)
        b, P = input_ids.shape
        stats = DecodeStats("ar", nfe_per_row=[0] * b, accepted=[[] for _ in range(b)])
        cache = self.new_cache(b, P + max_new_tokens)
        gen = torch.full((b, max(max_new_tokens, 1)), eos if eos is not None else 0, dtype=torch.long,
                         device=self.device)
        n_new = torch.zeros(b, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        row_nfe = torch.zeros(b, dtype=torch.long, device=self.device)
        tok = None
        for step in range(max_new_tokens):
            if step == 0:
                logits = self.causal_pass(input_ids, cache, valid, logits_to_keep=1)
            else:
                logits = self.causal_pass(tok[:, None], cache, logits_to_keep=1)
            stats.nfe += 1
            row_nfe += ~done
            tok = self.pick_tokens(logits[:, -1], temperature, top_p, generator)
            gen[:, step] = torch.where(done, gen[:, step], tok)
            n_new += ~done
            if eos is not None:
                done |= tok == eos
            if done.all():
                break
        stats.nfe_per_row = row_nfe.tolist()
        stats.accepted = [[1] * int(n) for n in n_new]
        return self._finish(input_ids, gen, n_new, eos, stats, t0)

    # -- 3.2 block diffusion ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, block_length=32, threshold=0.9, attention_mask=None,
                 temperature=0.0, top_p=1.0, eos_token_id=None, generator=None, causal_context=True,
                 policy: Optional[CommitPolicy] = None, sampler=None):
        """Block diffusion with a KV cache (spec §3.2).

        Per block: [AR seed, MASK x (B-1)] (all MASK without ``causal_context``); denoise passes
        (bidirectional over the cache, cache untouched) commit tokens per ``policy`` (default: the
        threshold rule, or HF's even split when ``threshold=None``) until no mask is left or, after a
        pass, the row holds an EOS with no mask before it (an EOS seed still gets one pass, as in the
        public code); then one causal KV-write pass whose last logit seeds the next block. NFE counts
        denoise and KV-write passes, not the prefill.

        ``sampler`` (a learned sampler or its folder, docs/addons.md): commit where the sampler's
        score is >= ``threshold`` (at least one position per pass) instead of the LM's confidence.
        """
        if max_new_tokens % block_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be a multiple of block_length "
                             f"({block_length})")
        t0 = time.perf_counter()
        input_ids, valid = _left_padded(input_ids.to(self.device), attention_mask)
        eos, mask_id = self._eos(eos_token_id), self.config.mask_token_id
        if sampler is not None:
            if policy is not None or threshold is None:
                raise ValueError("sampler= needs a threshold and no policy= (it is the commit policy)")
            policy = LearnedSamplerPolicy(as_sampler(sampler, self), threshold)
        if policy is None:
            policy = EvenSplitPolicy(block_length) if threshold is None else ThresholdPolicy(threshold)
        b, P = input_ids.shape
        dev = self.device
        stats = DecodeStats("diffusion", accepted=[[] for _ in range(b)])
        cache = self.new_cache(b, P + max_new_tokens)
        logits = self.causal_pass(input_ids, cache, valid, logits_to_keep=1)   # prefill: not counted
        seed = self.pick_tokens(logits[:, -1], temperature, top_p, generator)
        gen = torch.full((b, max_new_tokens), eos if eos is not None else 0, dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        row_nfe = torch.zeros(b, dtype=torch.long, device=dev)
        j = torch.arange(block_length, device=dev)[None]
        for k in range(max_new_tokens // block_length):
            block = torch.full((b, block_length), mask_id, dtype=torch.long, device=dev)
            if causal_context:
                block[:, 0] = seed
            if eos is not None:
                block[finished] = eos            # a finished row has nothing left to denoise
            n_init = (block == mask_id).sum(1)
            active = ~finished
            step = 0
            while True:
                # stop a row once a pass has left it with an EOS and no mask before it. Checked after
                # a pass, as the public code does: a block whose AR seed is already EOS still gets
                # one denoise pass (NFE 2 with the KV-write), so TPF compares with published numbers
                if eos is not None and step > 0:
                    is_eos = block == eos
                    first = torch.where(is_eos, j, block_length).min(1).values
                    mask_before = ((block == mask_id) & (j < first[:, None])).any(1)
                    active &= ~(is_eos.any(1) & ~mask_before)
                masked = (block == mask_id) & active[:, None]
                if not masked.any():
                    break
                logits = self.block_pass(block, cache)
                stats.nfe += 1
                row_nfe += masked.any(1)
                cand = self.pick_tokens(logits, temperature, top_p, generator)
                conf = self.confidence(logits, cand)
                policy.observe(logits, block)
                commit, tokens = policy.select(cand, conf, masked, step, n_init, k * block_length)
                commit &= masked
                block = torch.where(commit, tokens, block)
                for r in masked.any(1).nonzero()[:, 0].tolist():
                    stats.accepted[r].append(int(commit[r].sum()))
                step += 1
            if eos is not None:  # masks left after a row's EOS become EOS
                after = (block == eos).long().cumsum(1) > 0
                block = torch.where(after & (block == mask_id), eos, block)
            logits = self.causal_pass(block, cache, logits_to_keep=1)   # KV-write, counted
            stats.nfe += 1
            row_nfe += ~finished
            seed = self.pick_tokens(logits[:, -1], temperature, top_p, generator)
            gen[:, k * block_length:(k + 1) * block_length] = block
            if eos is not None:
                finished |= (block == eos).any(1)
                if finished.all():
                    break
        n_new, _ = self._cut_at_eos(gen, torch.full((b,), gen.shape[1], device=dev), eos)
        # a row that stopped early generated only up to its EOS: clip its count of passes too
        stats.nfe_per_row = row_nfe.tolist()
        return self._finish(input_ids, gen, n_new, eos, stats, t0)

    # -- 3.4 linear self-speculation ----------------------------------------------------------------
    @_uses_lora
    @torch.no_grad()
    def linear_spec_generate(self, input_ids, max_new_tokens, block_length=32, threshold=0.0,
                             attention_mask=None, temperature=0.0, top_p=1.0, eos_token_id=None,
                             generator=None, lora=None):
        """Diffusion draft + causal verify per cycle (spec §3.4), batched.

        Cycle: block = [next, MASK x (B-1)] at the row's cache length L0; draft (bidirectional, no
        cache update; ``threshold = 0`` fills all masks in one pass, else iterate the threshold rule);
        verify (causal, cache updated); accept the longest prefix where the verifier's argmax equals
        the next draft token, plus the verifier's bonus token; crop the row's cache to L0 + accepted.
        Greedy output equals ``ar_generate`` token for token. NFE counts the prefill. ``lora``: a
        LoRA drafter (adapter or folder) active in the draft passes only.
        """
        t0 = time.perf_counter()
        input_ids, valid = _left_padded(input_ids.to(self.device), attention_mask)
        eos, mask_id, B = self._eos(eos_token_id), self.config.mask_token_id, block_length
        b, P = input_ids.shape
        dev = self.device
        stats = DecodeStats("linear_spec", accepted=[[] for _ in range(b)])
        cache = self.new_cache(b, P + max_new_tokens + 2 * B)
        gen = torch.full((b, max_new_tokens + B), eos if eos is not None else 0, dtype=torch.long, device=dev)
        logits = self.causal_pass(input_ids, cache, valid, logits_to_keep=1)
        stats.nfe = 1
        row_nfe = torch.ones(b, dtype=torch.long, device=dev)
        nxt = self.pick_tokens(logits[:, -1], temperature, top_p, generator)
        take, done = self._cut_at_eos(nxt[:, None], torch.ones(b, dtype=torch.long, device=dev), eos)
        n_new = self._emit(gen, torch.zeros(b, dtype=torch.long, device=dev), nxt[:, None],
                           take.clamp(max=max_new_tokens))
        done |= n_new >= max_new_tokens
        draft_policy = ThresholdPolicy(threshold)
        while not done.all():
            L0 = cache.lengths()
            block = torch.full((b, B), mask_id, dtype=torch.long, device=dev)
            block[:, 0] = nxt
            step = 0
            while (block == mask_id).any():      # draft
                logits = self.block_pass(block, cache)
                stats.nfe += 1
                masked = block == mask_id
                cand = self.pick_tokens(logits, temperature, top_p, generator)
                if threshold <= 0:
                    block = torch.where(masked, cand, block)
                else:
                    commit, _ = draft_policy.select(cand, self.confidence(logits, cand), masked, step, None, 0)
                    block = torch.where(commit & masked, cand, block)
                row_nfe += ~done
                step += 1
            logits = self.causal_pass(block, cache)  # verify (writes all B, cropped below)
            stats.nfe += 1
            row_nfe += ~done
            ar = self.pick_tokens(logits, temperature, top_p, generator)
            # accepted prefix + the AR token at the first mismatch; emit AR's tokens
            a, n_new, done = self._accept(stats, gen, n_new, done, ar, block, ar, eos, max_new_tokens)
            # keep block[0..a-1] (= next + the accepted drafts); finished rows keep nothing new
            cache.crop(L0 + torch.where(done, 0, a))
            self._maybe_compact(cache, B)
            nxt = ar.gather(1, (a - 1)[:, None])[:, 0]
        stats.nfe_per_row = row_nfe.tolist()
        return self._finish(input_ids, gen, n_new, eos, stats, t0)

    # -- 3.5 quadratic self-speculation ----------------------------------------------------------
    @_uses_lora
    @torch.no_grad()
    def quadratic_spec_generate(self, input_ids, max_new_tokens, block_length=32, attention_mask=None,
                                temperature=0.0, top_p=1.0, eos_token_id=None, generator=None, lora=None):
        """One forward per cycle verifies the current draft and drafts every possible next block
        (spec §3.5), batched.

        Input per cycle: B groups [d_g, MASK x B]; anchors d_g form a causal chain over the cache
        (their argmax = the AR prediction after d_g); the masks of group g draft the block that
        follows if d_0..d_g are accepted. Accept d_0 and then d_i while AR(after d_{i-1}) == d_i;
        store the accepted anchors' keys; the next draft is [AR after the last accepted anchor ;
        that group's diffusion predictions]. The first pass fuses the prefill with the first draft.
        ``lora``: a LoRA drafter active on the mask tokens only (anchors are verifier tokens).
        """
        t0 = time.perf_counter()
        input_ids, valid = _left_padded(input_ids.to(self.device), attention_mask)
        eos, mask_id, B = self._eos(eos_token_id), self.config.mask_token_id, block_length
        b, P = input_ids.shape
        dev = self.device
        W = B + 1
        stats = DecodeStats("quadratic_spec", accepted=[[] for _ in range(b)])
        cache = self.new_cache(b, P + B * W + max_new_tokens + B)
        gen = torch.full((b, max_new_tokens + B), eos if eos is not None else 0, dtype=torch.long, device=dev)
        # fused prefill + first draft: [prompt ; MASK x B], prompt causal, block sees everything
        x = torch.cat([input_ids, torch.full((b, B), mask_id, dtype=torch.long, device=dev)], 1)
        plen = valid.sum(1)
        pos = torch.cat([(valid.long().cumsum(1) - 1).clamp(min=0),
                         plen[:, None] + torch.arange(B, device=dev)[None]], 1)
        self._lora_gate((torch.arange(P + B, device=dev) >= P)[None].expand(b, -1))  # the block only
        logits = self(x, pos, M.prefix_block_mask(cache.key_valid(), valid, B), cache, update_cache=False)
        cache.commit(P, valid=valid)  # the prompt's keys are a plain causal prefill: keep them
        stats.nfe = 1
        row_nfe = torch.ones(b, dtype=torch.long, device=dev)
        d = torch.cat([self.pick_tokens(logits[:, P - 1:P], temperature, top_p, generator),   # AR seed
                       self.pick_tokens(logits[:, P + 1:], temperature, top_p, generator)], 1)  # diffusion
        n_new = torch.zeros(b, dtype=torch.long, device=dev)
        done = torch.full((b,), max_new_tokens <= 0, dtype=torch.bool, device=dev)
        anchors = torch.arange(B, device=dev) * W
        g_off = torch.arange(B * W, device=dev)
        while not done.all():
            C = cache.lengths()
            x = torch.full((b, B, W), mask_id, dtype=torch.long, device=dev)
            x[:, :, 0] = d
            # anchor d_g at C+g, its masks at C+g+1 .. C+g+B
            pos = C[:, None] + g_off // W + g_off % W
            self._lora_gate((g_off % W != 0)[None].expand(b, -1))     # masks on, anchors off
            hidden = self(x.view(b, B * W), pos, M.quadratic_mask(cache.key_valid(), B), cache,
                          update_cache=False, return_hidden=True).view(b, B, W, -1)
            stats.nfe += 1
            row_nfe += ~done
            # vocabulary logits only where they are read: the B anchors, then one group's masks
            ar = self.pick_tokens(self.lm_head(hidden[:, :, 0]), temperature, top_p, generator)  # AR after d_g
            # d_0 always accepted, then d_i while AR after d_{i-1} agrees; emit the drafts
            a, n_new, done = self._accept(stats, gen, n_new, done, ar, d, d, eos, max_new_tokens)
            cache.commit(B * W, select=anchors)            # the anchors' keys are causal keys
            cache.crop(C + torch.where(done, 0, a))
            self._maybe_compact(cache, B)
            # next draft: group a-1, slot 1 replaced by the AR prediction, slots 2..B diffusion
            g = (a - 1)[:, None, None, None].expand(-1, 1, W, hidden.shape[-1])
            nxt_diff = self.lm_head(hidden.gather(1, g)[:, 0, 2:])
            d = torch.cat([ar.gather(1, a[:, None] - 1),
                           self.pick_tokens(nxt_diff, temperature, top_p, generator)], 1)
        stats.nfe_per_row = row_nfe.tolist()
        return self._finish(input_ids, gen, n_new, eos, stats, t0)


class NLDForDecoding(DecodingMixin, NLDModel):
    """The plain decoder with the four decoding modes (what :func:`load_model` returns)."""
