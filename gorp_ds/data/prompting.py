"""How a task's prompt and answer become text for the model: ``plain`` (our instruction, the
input and an answer cue, the answer after a space) or ``chat`` (the same instruction and input as
the user turn of the tokenizer's chat template, the answer as the assistant turn). Examples of a
chat task (``Example.messages``) always go through the chat template, in either format.

In both formats the loss covers only the answer tokens and the end-of-sequence token; in ``chat``
the rendered template already holds the model's special tokens (BOS, role markers), so the prompt
is tokenised without adding special tokens again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DataError
from .tasks import Example, Task

__all__ = ["PROMPT_FORMATS", "PromptFormat"]

PROMPT_FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "plain"

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_FORMATS:
            raise DataError(f"--prompt-format {self.kind!r}: choose one of {', '.join(PROMPT_FORMATS)}")

    @property
    def add_special_tokens(self) -> bool | None:
        """``None``: the tokenizer's own BOS rule (plain); ``False``: the template wrote them (chat)."""
        return False if self.kind == "chat" else None

    def check(self, tokenizer: Any) -> None:
        """A chat format needs a tokenizer that has a chat template."""
        if self.kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "--prompt-format chat: the model's tokenizer has no chat template (tokenizer_config.json "
                "'chat_template'); use --prompt-format plain, or a chat model such as LLaMA-2-chat"
            )

    def special_tokens(self, example: Example) -> bool | None:
        """:attr:`add_special_tokens` for one example: a chat example (``messages``) is always rendered
        through the template, whatever the format."""
        return False if example.messages is not None else self.add_special_tokens

    def prompt(self, tokenizer: Any, task: Task, example: Example) -> str:
        """Everything before the answer. A chat example (a chat task's, whatever the format) is its
        conversation rendered by the tokenizer's chat template, ready for the assistant's turn."""
        if example.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(
                    f"task {task.name} is a chat task, but the model's tokenizer has no chat template "
                    "(tokenizer_config.json 'chat_template'); use a chat model or an instruction task file"
                )
            return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in example.messages],
                                                 tokenize=False, add_generation_prompt=True)
        text = task.prompt(example)
        if self.kind == "plain":
            return text
        self.check(tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    def target(self, task: Task, example: Example) -> str:
        """The answer text (EOS is added by the tokenizer code). Chat answers start the assistant
        turn, so they carry no leading space."""
        return task.target(example) if self.kind == "plain" and example.messages is None else example.label
