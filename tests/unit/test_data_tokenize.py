"""Tokenisation: exact prompt masking, truncation of the input text only, padding, answer normalisation."""

from __future__ import annotations

import pytest
import torch

from gorp_ds.data import (
    DataError,
    Example,
    Task,
    collate_training,
    encode_for_training,
    encode_prompts,
    is_correct,
    normalize_answer,
)
from gorp_ds.data.tokenize import fit_prompt

CORPUS = [
    "Classify the input. Answer with one of: Good, Bad.",
    "Input: the movie was good and the actors were great",
    "Input: a bad film with bad acting and a long boring story",
    "Answer: Good Answer: Bad very negative positive neutral",
    "Code the color. red blue green black cat dog horse bird vex nar lux zig",
]


def tiny_tokenizer(with_bos: bool):
    """A byte-level BPE tokenizer trained on a few sentences (offline, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    kwargs = {"eos_token": "</s>", "pad_token": "<pad>"}
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tok(request):
    return tiny_tokenizer(request.param)


TASK = Task(
    name="sst",
    labels=("Good", "Bad"),
    instruction="Classify the input. Answer with one of: Good, Bad.",
    train=[Example("the movie was good", "Good")],
    test=[Example("a bad film", "Bad")],
)


def test_prompt_is_masked_exactly(tok) -> None:
    ex = Example("the movie was good and the actors were great", "Good")
    enc = encode_for_training(tok, TASK, ex, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    n_prompt = sum(1 for x in labels if x == -100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert supervised == labels[n_prompt:]
    assert tok.decode(supervised) == TASK.target(ex) + tok.eos_token == " Good</s>"
    assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == TASK.prompt(ex)
    if tok.bos_token is not None:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.convert_ids_to_tokens(ids[0]) != "<s>"
    assert ids[-1] == tok.eos_token_id


def test_truncation_cuts_only_the_left_of_the_input(tok) -> None:
    words = [f"w{i}" for i in range(200)]
    ex = Example(" ".join(words), "Bad")
    full = encode_for_training(tok, TASK, ex, max_length=10_000)
    assert len(full["input_ids"]) > 60
    for max_length in (60, 40):
        enc = encode_for_training(tok, TASK, ex, max_length=max_length)
        assert max_length - 3 <= len(enc["input_ids"]) <= max_length
        n_prompt = enc["labels"].count(-100)
        prompt = tok.decode(enc["input_ids"][:n_prompt], skip_special_tokens=True)
        assert prompt.startswith(TASK.instruction + "\nInput: ")
        assert prompt.endswith(" w199\nAnswer:")
        assert "w0 " not in prompt
        assert tok.decode([x for x in enc["labels"] if x != -100]) == " Bad</s>"
    with pytest.raises(DataError, match="max_length"):
        encode_for_training(tok, TASK, ex, max_length=12)


def test_truncation_with_multibyte_text(tok) -> None:
    ex = Example("héllo wörld ☃ 🙂 " * 40 + "end", "Good")
    enc = encode_for_training(tok, TASK, ex, max_length=48)
    assert len(enc["input_ids"]) <= 48
    n_prompt = enc["labels"].count(-100)
    assert tok.decode(enc["input_ids"][:n_prompt], skip_special_tokens=True).endswith(" end\nAnswer:")


def test_collate_right_pads(tok) -> None:
    batch = [encode_for_training(tok, TASK, Example(t, "Bad"), 256) for t in ("a bad film", "bad")]
    pad = tok.pad_token_id
    out = collate_training(batch, pad)
    n0, n1 = len(batch[0]["input_ids"]), len(batch[1]["input_ids"])
    assert n0 > n1 and out["input_ids"].shape == (2, n0)
    assert out["input_ids"][1, n1:].eq(pad).all() and out["labels"][1, n1:].eq(-100).all()
    assert out["attention_mask"].sum(1).tolist() == [n0, n1]
    assert out["input_ids"][1, :n1].tolist() == batch[1]["input_ids"]
    assert out["labels"][0].tolist() == batch[0]["labels"]
    assert out["input_ids"].dtype == torch.long


def test_encode_prompts_left_pads(tok) -> None:
    prompts = [TASK.prompt(Example("a bad film with bad acting", "Bad")), TASK.prompt(Example("bad", "Bad"))]
    out = encode_prompts(tok, prompts, max_length=256)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 2 and mask.shape == ids.shape
    assert mask[0].all()
    n1 = int(mask[1].sum())
    assert mask[1, -n1:].all() and not mask[1, :-n1].any()
    assert ids[1, :-n1].eq(tok.pad_token_id).all()
    assert tok.decode(ids[1, -n1:], skip_special_tokens=True) == prompts[1]
    # the same ids as the prompt part of the training encoding
    enc = encode_for_training(tok, TASK, Example("bad", "Bad"), 256)
    assert ids[1, -n1:].tolist() == enc["input_ids"][: enc["labels"].count(-100)]
    short = encode_prompts(tok, [TASK.prompt(Example(" ".join(["w"] * 300), "Bad"))], max_length=40)
    assert short["input_ids"].shape[1] <= 40
    assert tok.decode(short["input_ids"][0], skip_special_tokens=True).endswith("w\nAnswer:")


def test_fit_prompt_foreign_prompt_keeps_the_end(tok) -> None:
    ids = fit_prompt(tok, "no markers here " * 30 + "tail", 10)
    assert len(ids) == 10 and tok.decode(ids).endswith("tail")


@pytest.mark.parametrize(
    "generated,expected",
    [
        (" Good", "good"),
        ("Good.\nInput: more text", "good"),
        ("  very   Positive!! ", "very positive"),
        ("\n Science or Technology\n", "science or technology"),
        ("«Bad»", "bad"),
        ("", ""),
    ],
)
def test_normalize_answer(generated: str, expected: str) -> None:
    assert normalize_answer(generated) == expected


def test_is_correct() -> None:
    assert is_correct(" Good\nSome continuation", "Good")
    assert is_correct(" science or technology.", "Science or Technology")
    assert not is_correct(" Good movie", "Good")
    assert not is_correct(" negative", "very negative")
    assert not is_correct("", "Bad")
