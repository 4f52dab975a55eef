"""The evaluation's decoders (gorp_ds/cl/evaluate.py): ``generate`` (transformers' generate()) and
``loop`` (our own greedy loop) against Hugging Face's plain ``generate(do_sample=False)`` call and
against each other, token for token, and through a whole row of R."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from gorp_ds.cl.evaluate import (
    DECODERS,
    DEFAULT_DECODER,
    evaluate_row,
    greedy_generate,
    hf_generate,
)
from gorp_ds.data.tasks import Example, Task
from gorp_ds.data.tokenize import encode_prompts
from gorp_ds.models import LoraSettings, ModelConfig, add_lora, load_model_and_tokenizer


def _prompts() -> list[str]:
    return ["Code the color.\nInput: red the big one\nAnswer:", "Code the animal.\nInput: dog\nAnswer:",
            "Code the fruit.\nInput: the very old new pear this\nAnswer:", "x"]


def _reference(model, batch, new_tokens, eos, pad) -> torch.Tensor:
    """transformers' generate() called as its documentation shows, on the model itself."""
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=pad, eos_token_id=eos)
    return out[:, batch["input_ids"].shape[1]:]


def _load(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32", gradient_checkpointing=False))
    return model.eval(), tok


def test_the_registry_and_its_default():
    assert set(DECODERS) == {"generate", "loop"} and DEFAULT_DECODER == "generate"
    assert DECODERS["generate"] is hf_generate and DECODERS["loop"] is greedy_generate


def test_the_lm_head_sees_only_contiguous_inputs_and_is_left_unhooked(tiny_model_dir):
    """generate()'s first step slices the prompt's last positions out of ``B × L × hidden``: a
    strided input, which a CPU linear layer with a frozen bf16 weight (the base model's, under
    LoRA) runs as a batched matmul over a ``B``-fold copy of the weight. hf_generate hands the head
    a contiguous copy instead, during the call only; the tokens are unchanged."""
    model, tok = _load(tiny_model_dir)
    model = add_lora(model, LoraSettings(r=4, alpha=8)).eval()
    head = model.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad  # frozen, as in a run
    batch = encode_prompts(tok, _prompts(), 64)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] > 1
    seen: list[tuple[tuple[int, ...], bool]] = []
    spy = head.register_forward_hook(lambda module, args, out: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    try:
        hf_generate(model, batch["input_ids"], batch["attention_mask"], 3, tok.eos_token_id)
        reference = _reference(model, batch, 3, tok.eos_token_id, tok.eos_token_id)  # generate() as documented
    finally:
        spy.remove()
    ours, documented = seen[:3], seen[3:]
    assert [shape for shape, _ in ours] == [(4, 1, head.in_features)] * 3
    assert all(contiguous for _, contiguous in ours), ours
    # without the hook the first step's slice is strided: what the hook is there for
    assert documented[0] == ((4, 1, head.in_features), False), documented
    assert not head._forward_pre_hooks  # removed after the call
    ours_tokens = hf_generate(model, batch["input_ids"], batch["attention_mask"], 3, tok.eos_token_id)
    assert torch.equal(ours_tokens, reference)


def test_both_decoders_match_hf_generate(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    batch = encode_prompts(tok, _prompts(), 64)  # left-padded, different lengths
    assert (batch["attention_mask"] == 0).any()
    for new_tokens in (1, 3, 6):
        reference = _reference(model, batch, new_tokens, tok.eos_token_id, tok.eos_token_id)
        for name, decode in DECODERS.items():
            ours = decode(model, batch["input_ids"], batch["attention_mask"], new_tokens, tok.eos_token_id)
            assert ours.shape == (4, new_tokens), name  # nothing ends this early: full length
            assert torch.equal(ours, reference), (name, new_tokens)


def test_both_decoders_match_on_a_lora_model_with_eos_and_padding(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # a non-zero adapter that changes the output
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.eval()
    batch = encode_prompts(tok, _prompts(), 64)
    plain = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 8, tok.eos_token_id)
    # Rows that end at different steps: "end of sequence" is the token row 1 generates second.
    eos, pad = int(plain[1, 1]), tok.pad_token_id
    assert pad != eos and not (plain == eos).any(1).all(), "the test needs rows that end and rows that do not"
    reference = _reference(model, batch, 8, eos, pad)  # through PEFT's generate()
    outputs = {name: decode(model, batch["input_ids"], batch["attention_mask"], 8, eos, pad)
               for name, decode in DECODERS.items()}
    for name, ours in outputs.items():
        width = ours.shape[1]
        assert torch.equal(ours, reference[:, :width]), name
        assert width == reference.shape[1]  # both stop when every row has ended, as generate() does
    tokens = outputs["loop"]
    ended = (tokens == eos).cumsum(1) > 0  # at or after a row's first EOS
    assert ended[1, 1] and not ended[:, -1].all()
    after = ended & ~((tokens == eos) & ((tokens == eos).cumsum(1) == 1))  # strictly after the first EOS
    assert after.any() and (tokens[after] == pad).all()  # padded after the end, as generate() pads


def test_the_checkpoints_generation_config_plays_no_part(tiny_model_dir, capfd):
    """A checkpoint's generation_config.json (sampling flags, max_length, a repetition penalty) would
    change generate()'s greedy tokens and make it warn; evaluation decodes by its own settings only."""
    from transformers.utils import logging as hf_logging

    model, tok = _load(tiny_model_dir)
    batch = encode_prompts(tok, _prompts(), 64)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    loop = greedy_generate(model, ids, mask, 6, tok.eos_token_id)
    saved = model.generation_config
    saved.update(temperature=0.6, top_p=0.9, max_length=4096, repetition_penalty=5.0, no_repeat_ngram_size=1)
    # The same settings through a plain generate() call do change the tokens (the test can fail).
    assert not torch.equal(_reference(model, batch, 6, tok.eos_token_id, tok.eos_token_id), loop)
    getattr(hf_logging.warning_once, "cache_clear", lambda: None)()  # warnings said once per process
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_logging.set_verbosity(logging.WARNING)
        ours = hf_generate(model, ids, mask, 6, tok.eos_token_id)
        again = greedy_generate(model, ids, mask, 6, tok.eos_token_id)
    assert torch.equal(ours, loop) and torch.equal(again, loop)
    assert model.generation_config is saved and saved.repetition_penalty == 5.0  # given back unchanged
    printed = capfd.readouterr()
    assert [str(w.message) for w in caught] == [] and printed.err == "" and printed.out == ""


@pytest.mark.parametrize("batch_size", [3])
def test_a_row_of_r_is_the_same_with_either_decoder(tiny_model_dir, batch_size):
    model, tok = _load(tiny_model_dir)
    words = ["red", "blue", "green", "dog", "cat", "pear", "the big one", "x"]
    tasks = [Task(name=f"t{i}", labels=("yes", "no", "maybe"), instruction=f"Task {i}: answer.",
                  test=[Example(" ".join(words[(i + j) % 8: (i + j) % 8 + 3]), ("yes", "no", "maybe")[j % 3])
                        for j in range(7)]) for i in range(2)]
    results = {name: evaluate_row(model, tok, tasks, eval_samples=None, batch_size=batch_size, max_length=48,
                                  predictions=True, decoder=name) for name in DECODERS}
    generate, loop = results["generate"], results["loop"]
    assert generate.row == loop.row and len(generate.row) == 2
    assert [[r["generation"] for r in task] for task in generate.predictions] == \
        [[r["generation"] for r in task] for task in loop.predictions]
    assert [len(task) for task in generate.predictions] == [7, 7]
    assert any(r["generation"] for task in generate.predictions for r in task)  # something was generated
