"""The ``--layout nld`` export against what the public Nemotron-Labs-Diffusion remote code relies on
(issue 18 item 6; the block-diffusion EOS-seed NFE rule is in tests/test_inference_invariants.py):
both rope keys its attention reads for every model, and a tokenizer that loads without a prompt."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env
from tests.test_convert import FAMILIES, make_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dist1):
    """Per family (plain RoPE with a tokenizer: llama; YaRN + query scaling: ministral3): the HF
    model, and its --layout nld export."""
    from nld_train.convert.export import to_hf
    from nld_train.convert.importer import from_hf
    out = {}
    for family in ("llama", "ministral3"):
        root = tmp_path_factory.mktemp(f"nldexp_{family}")
        model = make_hf(family, root / "hf")
        from_hf(root / "hf", root / "nld", **FAMILIES[family][3])
        to_hf(root / "nld", root / "pub", layout="nld")
        out[family] = dict(model=model, pub=root / "pub", nld=root / "nld")
    return out


def test_both_rope_keys_are_written_for_every_model(exports):
    """The public attention reads rope_parameters["llama_4_scaling_beta"] and
    ["original_max_position_embeddings"] for every model: without query scaling they are written
    as beta 0 (a scale of exactly 1) and the context length; the importer reads beta 0 as none."""
    from nld_train.inference.hf_format import read_hf_folder
    plain = json.loads((exports["llama"]["pub"] / "config.json").read_text())
    rp = plain["rope_parameters"]
    assert rp["llama_4_scaling_beta"] == 0.0 and rp["rope_type"] == "default"
    assert rp["original_max_position_embeddings"] == plain["max_position_embeddings"] == 256 > 0
    cfg, _, _, _ = read_hf_folder(exports["llama"]["pub"])
    assert cfg.query_scaling_beta is None and cfg.rope_scaling is None
    scaled = json.loads((exports["ministral3"]["pub"] / "config.json").read_text())["rope_parameters"]
    assert scaled["llama_4_scaling_beta"] == 0.1 and scaled["original_max_position_embeddings"] == 64
    cfg, _, _, _ = read_hf_folder(exports["ministral3"]["pub"])
    assert cfg.query_scaling_beta == pytest.approx(0.1) and cfg.rope_scaling["original_max_position_embeddings"] == 64


def test_beta_zero_imports_as_no_query_scaling():
    """A config that writes beta 0 next to YaRN (the public release's shape with scaling off)."""
    from nld_train.inference.hf_format import _rope
    rp = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64,
          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert _rope({"rope_parameters": {**rp, "llama_4_scaling_beta": 0.0}})[2] is None
    assert _rope({"rope_parameters": {**rp, "llama_4_scaling_beta": 0.2}})[2] == 0.2


TOKENIZER_CHILD = """
import sys, time
from nld_train.inference import load_tokenizer
t0 = time.time()
tok = load_tokenizer(sys.argv[1])
print(type(tok).__name__, tok.mask_token_id, round(time.time() - t0, 1))
"""


def test_load_tokenizer_of_an_nld_export_never_reads_stdin(exports):
    """The export's config names remote-code files it does not ship (auto_map): loading its
    tokenizer must not ask whether to trust them. Stdin is a pipe that never answers (a prompt
    would wait ~15 s, then fail), and the child must be done well before that."""
    pub = exports["llama"]["pub"]
    assert "auto_map" in json.loads((pub / "config.json").read_text())
    with subprocess.Popen([sys.executable, "-c", TOKENIZER_CHILD, str(pub)], cwd=REPO, env=child_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert p.returncode == 0, err[-2000:]
    assert "custom code" not in out + err and "trust_remote_code" not in out + err, out + err[-2000:]
    name, mask_id, seconds = out.split()
    assert int(mask_id) == 1 and float(seconds) < 10, out
