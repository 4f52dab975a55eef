"""Task and example records shared by every data source (embedded, CL_Benchmark, ``datasets``,
instruction and chat files).

A task is phrased as generation: the model reads ``prompt(example)`` and must generate
``target(example)`` (a space followed by the answer). Its ``kind`` says where its examples came from
(``classification``: a label word from ``labels``; ``instruction``: a free-form answer; ``chat``: the
last assistant message of a conversation) and ``metric`` (a key of
:data:`gorp_ds.data.metrics.TASK_METRICS`) how an answer is scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Example", "Task", "INPUT_MARK", "ANSWER_MARK", "lone_surrogate"]

#: Text placed between the instruction and the input, and the answer cue that ends every prompt.
#: ``gorp_ds.data.tokenize`` relies on these markers to truncate only the input text.
INPUT_MARK = "\nInput: "
ANSWER_MARK = "\nAnswer:"

# A UTF-16 surrogate code point (U+D800-U+DFFF). JSON can spell one with an escape ("\\ud800") and
# Python's json module returns it as is, but it is not a character: no tokenizer encodes it (the
# tokenizers library raises a TypeError mid-run) and it cannot be written as UTF-8. Such text is
# refused when loaded rather than altered, so that what trains is exactly what the file says.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The index of the first surrogate code point in ``text`` (None if there is none)."""
    found = _SURROGATE.search(text)
    return found.start() if found else None


@dataclass(frozen=True)
class Example:
    """One input text and its answer (the label word of a classification task). An instruction
    record may carry its own ``instruction``; a chat example its conversation up to (not including)
    the answer, as ``messages`` ((role, content) pairs)."""

    text: str
    label: str
    instruction: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass
class Task:
    """A named task with an instruction, label words (empty for free-form answers), train/test
    examples, its kind, its metric and (free-form answers) its generation length."""

    name: str
    labels: tuple[str, ...]
    instruction: str
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    kind: str = "classification"
    metric: str = "accuracy"
    #: New tokens generated at evaluation (None: the longest label + 1, or --max-target-length).
    max_new_tokens: int | None = None

    def prompt(self, example: Example) -> str:
        """Full prompt up to and including the answer cue (no trailing space)."""
        return f"{example.instruction or self.instruction}{INPUT_MARK}{example.text}{ANSWER_MARK}"

    def target(self, example: Example) -> str:
        """Text the model must generate right after :meth:`prompt` (EOS is added by the tokenizer code)."""
        return " " + example.label

    def __repr__(self) -> str:  # the example lists are long; keep reprs readable in logs
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, metric={self.metric!r}, labels={self.labels!r}, train={len(self.train)}, "
            f"test={len(self.test)})"
        )
