"""``--prompt-format chat``: prompts through the tokenizer's chat template (training and
evaluation alike), the loss on the answer tokens only, and a clear error without a template."""

from __future__ import annotations

import pytest

from gorp_ds.data.errors import DataError
from gorp_ds.data.prompting import PromptFormat
from gorp_ds.data.tasks import Example, Task
from gorp_ds.data.tokenize import IGNORE_INDEX, encode_for_training, encode_prompts

# A LLaMA-2-chat-like template: the rendered text starts with BOS and marks the turns.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
TASK = Task("sentiment", ("Good", "Bad"), "Is this review good or bad? Answer with one of: Good, Bad.")
EXAMPLE = Example("a fine and moving film", "Good")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_model import make_tokenizer

    tok = make_tokenizer(tmp_path_factory.mktemp("chat_tok"))
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompt_is_the_rendered_template(tokenizer) -> None:
    fmt = PromptFormat("chat")
    text = fmt.prompt(tokenizer, TASK, EXAMPLE)
    assert text == f"<s>[INST] {TASK.prompt(EXAMPLE)} [/INST]"
    assert fmt.target(TASK, EXAMPLE) == "Good"  # the assistant turn, no leading space
    assert PromptFormat("plain").prompt(tokenizer, TASK, EXAMPLE) == TASK.prompt(EXAMPLE)


def test_chat_training_ids_and_loss_mask(tokenizer) -> None:
    fmt = PromptFormat("chat")
    enc = encode_for_training(tokenizer, TASK, EXAMPLE, 256, prompt_format=fmt)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": TASK.prompt(EXAMPLE)}], tokenize=False,
                                             add_generation_prompt=True)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Good", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert enc["input_ids"] == prompt_ids + answer_ids
    assert enc["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    # the loss covers exactly the answer and EOS: every prompt position is ignored
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    supervised = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "Good</s>"
    # evaluation feeds the very same prompt tokens (left-padded)
    batch = encode_prompts(tokenizer, [fmt.prompt(tokenizer, TASK, EXAMPLE)], 256, fmt.add_special_tokens)
    assert batch["input_ids"][0].tolist() == prompt_ids


def test_chat_prompt_truncates_only_the_input(tokenizer) -> None:
    fmt = PromptFormat("chat")
    long = Example(" ".join(["film"] * 400), "Bad")
    enc = encode_for_training(tokenizer, TASK, long, 96, prompt_format=fmt)
    assert len(enc["input_ids"]) <= 96
    text = tokenizer.decode(enc["input_ids"])
    assert text.startswith("<s>[INST] " + TASK.instruction) and "[/INST]" in text and text.endswith("Bad</s>")


def test_separate_source_and_target_lengths(tokenizer) -> None:
    enc = encode_for_training(tokenizer, TASK, Example(" ".join(["film"] * 400), "Good"), 10_000,
                              max_source_length=80, max_target_length=50)
    prompt = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label == IGNORE_INDEX]
    assert 60 < len(prompt) <= 80 and len(enc["input_ids"]) - len(prompt) <= 50


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path) -> None:
    from tests.support.tiny_model import make_tokenizer

    plain = make_tokenizer(tmp_path)
    plain.chat_template = None
    with pytest.raises(DataError, match="--prompt-format chat: the model's tokenizer has no chat template") as err:
        encode_for_training(plain, TASK, EXAMPLE, 256, prompt_format=PromptFormat("chat"))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="--prompt-format 'xml'"):
        PromptFormat("xml")


@pytest.mark.slow
def test_launch_with_chat_format_and_no_template_exits_2(tiny_model_dir) -> None:
    import subprocess
    import sys

    from tests.support import REPO as repo
    from tests.support.launch import one_rank_env

    env = one_rank_env()
    proc = subprocess.run([sys.executable, str(repo / "launch" / "train.py"), "--model", str(tiny_model_dir),
                           "--prompt-format", "chat"], env=env, cwd=repo, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gorp_ds: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "no chat template" in errors[0]
