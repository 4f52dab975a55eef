"""``gorp_ds_prompt.json`` beside every export: how the run turned a test example into the model's
input and its generation into a prediction, so that the run's predictions can be reproduced from
the export with transformers alone (docs/export.md has the snippet).

The record holds, per task, the prompt template text (the task's instruction filled in, ``{input}``
left for the example's text), the label words and the generation budget; and, for all tasks, the
prompt format (plain or the tokenizer's chat template, whose text is copied in), the special-token
rule, the prompt token budget and its truncation, greedy decoding and the answer normalisation.
Built from the same functions the evaluation uses (``PromptFormat``, ``evaluation_settings``, the
label budget), and checked against them on one example per task when it is built.
"""

from __future__ import annotations

import os
from typing import Any

from ..data.prompting import PromptFormat
from ..data.tasks import ANSWER_MARK, INPUT_MARK, Example, Task
from ..export.peft_adapter import write_json
from ..log import get_logger
from .evaluate import _label_budget
from .session import evaluation_settings

log = get_logger(__name__)

PROMPT_RECORD_NAME = "gorp_ds_prompt.json"
RECORD_VERSION = 1  # raised when a field changes meaning
INPUT_SLOT = "{input}"  # where a task's template takes the example's text (str.replace, not str.format)

NORMALISATION = [
    "drop leading white space",
    "cut at the first newline",
    "lower case",
    "remove punctuation: ASCII string.punctuation and every Unicode character of category P*",
    "collapse runs of white space to one space and strip",
]


def task_template(task: Task) -> str:
    """The task's prompt with ``{input}`` in place of the example's text (before any chat template)."""
    return f"{task.instruction}{INPUT_MARK}{INPUT_SLOT}{ANSWER_MARK}"


def fill(template: str, text: str) -> str:
    """A record's template with the example's text in (what a user of the record does)."""
    return template.replace(INPUT_SLOT, text)


def prompt_record(tasks: list[Task], tokenizer: Any, cfg: Any, method: str) -> dict[str, Any]:
    """The record of ``tasks`` as evaluated with ``cfg``'s settings (a :class:`RunConfig`)."""
    settings = evaluation_settings(cfg)
    fmt: PromptFormat = settings["prompt_format"]
    chat = fmt.kind == "chat"
    entries = []
    for task in tasks:
        template = task_template(task)
        probe = task.test[0] if task.test else Example("an input text", task.labels[0] if task.labels else "")
        # The record must give exactly the evaluation's prompt (a task type with another prompt
        # would need another record): checked on one example.
        rendered = fill(template, probe.text)
        if chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": rendered}], tokenize=False,
                                                     add_generation_prompt=True)
        if rendered != fmt.prompt(tokenizer, task, probe):  # not fatal: the run's results stand without it
            log.warning(f"task {task.name}: its prompt is not instruction, input and answer cue; the prompt "
                        "record gives no template for it")
            template = None
        entries.append({"name": task.name, "template": template, "labels": list(task.labels),
                        "metric": task.metric,
                        "max_new_tokens": task.max_new_tokens or settings["max_new_tokens"]
                        or _label_budget(tokenizer, task, fmt)})
    return {
        "record_version": RECORD_VERSION,
        "method": method,
        "format": fmt.kind,
        "chat_template": chat,
        "input_slot": INPUT_SLOT,
        "how": ("prompt = template.replace(input_slot, text)" +
                ("; then tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False, "
                 "add_generation_prompt=True)" if chat else "")),
        "tokenizer_chat_template": getattr(tokenizer, "chat_template", None) if chat else None,
        # plain: the tokenizer's special tokens iff it has a BOS token; chat: the template wrote them
        "add_special_tokens": False if chat else getattr(tokenizer, "bos_token", None) is not None,
        "drop_trailing_eos": "a prompt whose tokens end with EOS (EOS != BOS) loses that EOS",
        "max_prompt_tokens": settings["max_length"],
        # test examples per task the run evaluated (the first n of the seeded sample; null: all)
        "eval_samples": cfg.data.eval_samples,
        "truncation": (f"a prompt over max_prompt_tokens loses tokens from the left of the example's text (between "
                       f"{INPUT_MARK!r} and the last {ANSWER_MARK!r}); the instruction and the answer cue stay"),
        "padding": "left (batched greedy generation); the pad id is the tokenizer's pad token, else EOS",
        "decoding": "greedy; stop at the tokenizer's EOS or after the task's max_new_tokens; decode the new tokens "
                    "with skip_special_tokens=True",
        "answer": ("the assistant turn: the label word, then EOS" if chat else
                   "the continuation of the prompt: a space, the label word, then EOS"),
        "normalisation": NORMALISATION,
        "correct": "normalised generation == normalised label",
        "tasks": entries,
    }


def record_differences(record: dict[str, Any], tasks: list[Task], cfg: Any) -> list[str]:
    """Where an evaluation with ``cfg`` of ``tasks`` differs from the run that wrote ``record``
    (its task list, prompt format, prompt budget, test sample): each would change R's row, so an
    ``--eval-only`` of the export would not give the run's last row back. Empty when none does."""
    settings = evaluation_settings(cfg)
    ours = {"tasks": [t.name for t in tasks], "format": settings["prompt_format"].kind,
            "max_prompt_tokens": settings["max_length"], "eval_samples": cfg.data.eval_samples}
    flags = {"tasks": "--tasks", "format": "--prompt-format", "max_prompt_tokens": "--max-length",
             "eval_samples": "--eval-samples"}
    recorded = {**record, "tasks": [t.get("name") for t in record.get("tasks") or []]}
    return [f"{flags[key]} {_shown(value)} (the run: {_shown(recorded[key])})" for key, value in ours.items()
            if key in recorded and recorded[key] != value]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def write_prompt_record(tasks: list[Task], tokenizer: Any, cfg: Any, method: str, directory: str) -> str:
    """Write the record into ``directory`` (rank 0); returns its path."""
    path = os.path.join(directory, PROMPT_RECORD_NAME)  # its directory is made by the (guarded) write
    write_json(prompt_record(tasks, tokenizer, cfg, method), path, what="the prompt record")
    return path
