"""The SOL oracle (spec §3.7): commits every masked position whose argmax equals greedy AR."""
import pytest
import torch

from nld_train.inference.sol import sol_tpf
from tests.test_inference_invariants import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sol_on_a_constant_model_is_two_passes_per_block():
    """Zero final norm -> all logits 0 -> every argmax is token 0 (the mask id is excluded), so every
    masked position matches the reference at once: 1 denoise + 1 KV-write per block."""
    model = random_model(0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    res = sol_tpf(model, torch.tensor([[3, 4, 5]]), max_new_tokens=8, block_length=4, eos_token_id=-1)
    assert res.nfe == 4 and res.tpf == 2.0 and res.mean_accepted == 3 and res.forced == 0
    assert res.matches_reference


def test_sol_reproduces_reference_and_bounds():
    model = random_model(1)
    ids = torch.tensor([[3, 4, 5], [2, 9, 7]])
    res = sol_tpf(model, ids, max_new_tokens=16, block_length=8, eos_token_id=-1)
    assert res.matches_reference
    # per block between 1 denoise + write (TPF 4) and 7 denoise + write (TPF 1)
    assert 1.0 <= res.tpf <= 4.0 and res.nfe <= 2 * 8


def test_sol_rows_end_at_eos_as_in_diffusion_mode():
    """The constant model's argmax is token 0 everywhere: with 0 as EOS, a row's first block is its
    AR seed (EOS) alone, so SOL counts 1 token over 1 denoise + 1 KV-write pass (TPF 0.5, as
    diffusion mode counts it), not the 8 tokens decoded when EOS is ignored."""
    model = random_model(0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    ids = torch.tensor([[3, 4, 5]])
    res = sol_tpf(model, ids, max_new_tokens=8, block_length=4, eos_token_id=0)
    assert model.last_stats.new_tokens == [1] and res.nfe == 2 and res.tpf == 0.5 and res.matches_reference
    model.generate(ids, 8, block_length=4, threshold=0.9, eos_token_id=0)
    assert model.last_stats.new_tokens == [1] and model.last_stats.tpf == res.tpf
