"""Small LLaMA model directories for runner tests and systems benchmarks: a byte-level BPE
tokenizer trained on the embedded tasks' text plus either random weights (tiny models) or only a
``config.json`` (large shapes, loaded with ``--model random-init:<dir>``)."""

from __future__ import annotations

from pathlib import Path


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gorp_ds.data.config import DataConfig
    from gorp_ds.data.embedded import EMBEDDED_CLASSIFICATION
    from gorp_ds.data.registry import load_task_sequence

    corpus = []
    # The classification tasks only: the vocabulary (and the golden trajectories) predate emb_reverse,
    # whose words are theirs.
    for task in load_task_sequence(DataConfig(tasks=list(EMBEDDED_CLASSIFICATION), eval_samples=20,
                                              max_train_per_task=200)):
        corpus += [task.prompt(e) + task.target(e) for e in task.train[:200]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model_dir(path: str | Path, *, hidden: int = 32, layers: int = 2, intermediate: int | None = None,
                        heads: int = 4, kv_heads: int = 2, vocab: int | None = None, weights: bool = True,
                        seed: int = 0, chat_template: str | None = None) -> Path:
    """A random LLaMA of the given shape and its BPE tokenizer in ``path`` (``weights=False``: the
    config only); ``chat_template`` (a Jinja template) goes into tokenizer_config.json for chat tasks."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    if chat_template is not None:
        settings = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": chat_template}))
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate or 2 * hidden + 8, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if weights:
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    return path


if __name__ == "__main__":  # python -m tests.support.tiny_model <dir> --llama2-7b-shape
    import sys

    target = sys.argv[1]
    if "--llama2-7b-shape" in sys.argv:
        make_tiny_model_dir(target, hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                            weights=False)
    else:
        make_tiny_model_dir(target)
    print(target)
