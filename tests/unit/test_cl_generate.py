"""greedy_generate (used for R) against Hugging Face's generate(do_sample=False), token for token."""

from __future__ import annotations

import torch

from gorp_ds.cl.evaluate import greedy_generate
from gorp_ds.data.tokenize import encode_prompts
from gorp_ds.models import LoraSettings, ModelConfig, add_lora, load_model_and_tokenizer


def _prompts() -> list[str]:
    return ["Code the color.\nInput: red the big one\nAnswer:", "Code the animal.\nInput: dog\nAnswer:",
            "Code the fruit.\nInput: the very old new pear this\nAnswer:", "x"]


def _reference(model, batch, new_tokens, tok) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return out[:, batch["input_ids"].shape[1]:]


def test_greedy_generate_matches_hf_generate(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False))
    model.eval()
    batch = encode_prompts(tok, _prompts(), 64)  # left-padded, different lengths
    assert (batch["attention_mask"] == 0).any()
    for new_tokens in (1, 3, 6):
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], new_tokens, tok.eos_token_id)
        reference = _reference(model, batch, new_tokens, tok)
        assert torch.equal(ours, reference[:, : ours.shape[1]])


def test_greedy_generate_matches_on_a_lora_model_with_eos(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False))
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # a non-zero adapter that changes the output
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    # Make end-of-sequence likely so that rows finish at different steps.
    head = model.get_base_model().get_output_embeddings()
    head.weight.data[tok.eos_token_id] += 0.6 * head.weight.data.std() * torch.randn_like(head.weight[0]).sign()
    model.eval()
    batch = encode_prompts(tok, _prompts(), 64)
    ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 8, tok.eos_token_id)
    reference = _reference(model, batch, 8, tok)
    width = ours.shape[1]
    assert torch.equal(ours, reference[:, :width])
    assert width == 8 or (ours[:, -1] == tok.eos_token_id).all()  # stopped early only when all finished
