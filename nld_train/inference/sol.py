"""SOL ("speed of light") oracle for block diffusion (spec §3.7).

An upper bound on diffusion-mode TPF for a sampler that knows which positions are safe to commit
together: decode with the normal block-diffusion loop (block 32, AR seed, KV-write pass counted) but
commit, at every denoise pass, *all* masked positions whose argmax already equals the reference
token (the model's own greedy AR continuation). If no masked position matches, the reference token
is forced at the leftmost masked position (one token, as the worst real sampler would commit), so
the decode stays on the reference and the count stays comparable; forced commits are reported.

A row ends at its EOS as in diffusion mode (the tokens up to and including the EOS are counted, and
the passes until they are fixed), so the SOL TPF is the ceiling of the diffusion row it is printed
beside; ``eos_token_id=-1`` ignores EOS and decodes all ``max_new_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nld_train.inference.policies import CommitPolicy


class OraclePolicy(CommitPolicy):
    def __init__(self, reference: torch.Tensor):
        self.reference = reference        # [b, N] greedy AR tokens after the prompt
        self.forced = 0

    def select(self, cand, conf, masked, step, n_init, offset):
        ref = self.reference[:, offset: offset + cand.shape[1]]
        hit = masked & (cand == ref)
        need = masked.any(1) & ~hit.any(1)
        leftmost = masked & (masked.long().cumsum(1) == 1)
        force = leftmost & need[:, None]
        self.forced += int(force.sum())
        return hit | force, torch.where(force, ref, cand)


@dataclass
class SOLResult:
    tpf: float                 # generated tokens / NFE (denoise + KV-write passes), all rows
    nfe: int                   # forward passes of the batch
    mean_accepted: float       # tokens committed per denoise pass
    forced: int                # commits where no argmax matched the reference
    matches_reference: bool    # the oracle decode reproduced the AR reference (always, up to ties)


@torch.no_grad()
def sol_tpf(model, input_ids, max_new_tokens: int = 64, block_length: int = 32, attention_mask=None,
            eos_token_id=None) -> SOLResult:
    """SOL TPF of a prompt batch: reference = greedy AR of ``max_new_tokens`` tokens; rows end at
    EOS (``eos_token_id``: default the model's; -1: none) as they do in diffusion mode."""
    if max_new_tokens % block_length:
        raise ValueError("max_new_tokens must be a multiple of block_length")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    P = input_ids.shape[1]
    # the reference runs through EOS: positions after a row's EOS are never compared
    ar, _ = model.ar_generate(input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=-1)
    ref = ar[:, P:]
    policy = OraclePolicy(ref)
    out, nfe = model.generate(input_ids, max_new_tokens, block_length=block_length, attention_mask=attention_mask,
                              eos_token_id=eos_token_id, policy=policy)
    st = model.last_stats
    same = all(out[r, P: P + n].tolist() == ref[r, :n].tolist() for r, n in enumerate(st.new_tokens))
    return SOLResult(tpf=st.tpf, nfe=nfe, mean_accepted=st.mean_accepted, forced=policy.forced,
                     matches_reference=same)
