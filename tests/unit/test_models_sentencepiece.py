"""The SentencePiece path of LLaMA-2-style checkpoints, offline: a ``tokenizer.model`` trained here
(unk 0, bos 1, eos 2 and byte fallback, as LLaMA-2's) next to a tiny random LlamaForCausalLM, loaded by the project's
loader and used for training encodings and greedy evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from gorp_ds.cl.evaluate import evaluate_row
from gorp_ds.data.config import DataConfig
from gorp_ds.data.registry import load_task_sequence
from gorp_ds.data.tokenize import encode_for_training
from gorp_ds.models import ModelConfig, load_model_and_tokenizer


@pytest.fixture(scope="module")
def llama2_style_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama2_spm")
    tasks = load_task_sequence(DataConfig(max_train_per_task=300, eval_samples=8))
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(t.prompt(e) + t.target(e) for t in tasks for e in t.train))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
    )
    # As LLaMA-2 checkpoints ship it: BOS added to every encoding, EOS not.
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False})
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path, tasks


def test_sentencepiece_tokenizer_loads_like_llama2(llama2_style_dir):
    path, tasks = llama2_style_dir
    model, tok = load_model_and_tokenizer(ModelConfig(model=str(path), dtype="fp32", gradient_checkpointing=False))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.pad_token_id is not None  # the loader falls back to EOS for padding
    task = tasks[0]
    example = task.train[0]
    encoded = encode_for_training(tok, task, example, max_length=64)
    assert encoded["input_ids"][0] == 1  # BOS from the tokenizer's own handling
    supervised = [t for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != -100]
    assert supervised[-1] == 2 and tok.decode(supervised[:-1]).strip() == example.label
    prompt_ids = [t for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab == -100]
    assert tok.decode(prompt_ids, skip_special_tokens=True) == task.prompt(example)


def test_sentencepiece_model_evaluates(llama2_style_dir):
    path, tasks = llama2_style_dir
    model, tok = load_model_and_tokenizer(ModelConfig(model=str(path), dtype="fp32", gradient_checkpointing=False))
    row = evaluate_row(model, tok, tasks[:2], eval_samples=4, batch_size=4, max_length=64).row
    assert len(row) == 2 and all(0.0 <= v <= 100.0 for v in row)
