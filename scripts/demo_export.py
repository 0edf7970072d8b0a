"""End of `make demo`: load the `nld-convert to-hf` export with transformers, twice, and check it.

    python scripts/demo_export.py <hf_dir> <checkpoint> [prompt ...]
    python scripts/demo_export.py <hf_dir> <checkpoint> --task demo_math:2

``--task <name>:<n>`` takes the first n prompts of an nld-eval task, encoded as nld-eval encodes
them (with the tokenizer's special tokens); plain prompts are encoded without.

Loads the folder as a plain causal LM (no remote code) and with ``trust_remote_code=True``, and
checks, per prompt, that greedy AR output of both equals nld-train's own inference on the training
checkpoint (``nld-generate``'s decoder); the remote-code model's other three modes are run too.
Exits 1 on any difference.
"""
from __future__ import annotations

import sys
import time

import torch


def main(argv) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nld_train.inference import load_model
    hf_dir, ckpt, prompts = argv[0], argv[1], argv[2:] or ["ROMEO:", "JULIET:"]
    specials = False
    if prompts[0] == "--task":
        from nld_train.cli import task_prompts
        if len(prompts) != 2 or ":" not in prompts[1]:
            raise SystemExit("usage: demo_export.py <hf_dir> <checkpoint> --task <name>:<n>")
        name, count = prompts[1].rsplit(":", 1)
        prompts, _ = task_prompts(name, int(count))
        specials = True
    n = 96 if specials else 48          # a whole worked answer (<= 75 tokens) / a Shakespeare line
    tok = AutoTokenizer.from_pretrained(hf_dir)
    plain = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    remote = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ref = load_model(ckpt)
    print(f"loaded {hf_dir}: plain {type(plain).__name__}, remote code {type(remote).__name__}")
    ok = True
    for p in prompts:
        ids = torch.tensor([tok.encode(p, add_special_tokens=specials)])
        want, _ = ref.ar_generate(ids, n)
        got_remote, _ = remote.ar_generate(ids, n)
        with torch.no_grad():
            got_plain = plain.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id)
        L = want.shape[1]  # HF stops at EOS too; nld pads after EOS with EOS
        same_plain = got_plain[0].tolist() == want[0, : got_plain.shape[1]].tolist() and (
            got_plain.shape[1] == L or want[0, got_plain.shape[1]:].eq(tok.eos_token_id).all())
        same_remote = torch.equal(got_remote, want)
        ok &= same_plain and same_remote
        print(f"{p!r}: transformers AR == nld-generate AR: {same_plain}; remote-code AR: {same_remote}")
        print("   ", repr(tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)))
        for mode in ("generate", "linear_spec_generate", "quadratic_spec_generate"):
            t0 = time.time()
            out, nfe = getattr(remote, mode)(ids, 96 if specials else 64)
            print(f"    remote {mode}: {out.shape[1] - ids.shape[1]} tokens, nfe {nfe}, {time.time() - t0:.2f}s")
    print("export check:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
