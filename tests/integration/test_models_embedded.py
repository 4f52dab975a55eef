"""The embedded default model: every rank of a launch asks for the converted copy at once; it is
converted exactly once, completely (whichever rank converts), and equals the GGUF it came from."""

from __future__ import annotations

import pytest
import torch

from tests.support.dist_utils import run_ranks
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow
PROMPT = "Code the color.\nInput: the red big one\nAnswer:"


def _gguf():
    from gorp_ds.models import embedded_file

    found = embedded_file.find()
    if found is None:
        pytest.skip("the embedded model's file is not installed (python -m gorp_ds.models.embedded_file)")
    return found


def _load_on_rank(rank: int, world: int, cache_dir: str) -> dict:
    import os

    from gorp_ds.models import ModelConfig, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(dtype="fp32", gradient_checkpointing=False, cache_dir=cache_dir))
    with torch.no_grad():
        logits = model(tok(PROMPT, return_tensors="pt")["input_ids"]).logits[0, -1]
    return {"logits": logits, "files": sorted(os.listdir(os.path.join(cache_dir, "SmolLM2-135M-Instruct.Q4_1-hf")))}


def test_two_ranks_convert_once_and_match_the_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf()

    def expected_logits() -> torch.Tensor:  # transformers' own GGUF loading, in this process
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        with torch.no_grad():
            return reference(tok(PROMPT, return_tensors="pt")["input_ids"]).logits[0, -1]

    # One rank converts while the other waits for it: the reference is loaded beside them.
    results, expected = side_by_side(
        lambda: run_ranks(2, _load_on_rank, str(tmp_path / "cache"), out_dir=str(tmp_path / "ranks")),
        expected_logits)
    for result in results:
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(result["files"])
        assert torch.equal(result["logits"], expected)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
