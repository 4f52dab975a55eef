"""Tokenisation for training (prompt masked from the loss) and for greedy-generation evaluation.

Prompt and target are tokenised separately and the ids concatenated, so the loss mask boundary is
exact: ``labels`` is -100 on every prompt token and equals ``input_ids`` on the answer tokens and
the final EOS. Over-long examples lose tokens from the left of the *input text* first; the
instruction and the answer cue are never cut; only a free-form answer too long for what is left
loses tokens from its end (see :func:`encode_for_training`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Any

import torch

from .errors import DataError
from .prompting import PromptFormat
from .tasks import ANSWER_MARK, INPUT_MARK, Example, Task

__all__ = [
    "IGNORE_INDEX",
    "check_fits",
    "collate_training",
    "encode_for_training",
    "encode_prompts",
    "fit_prompt",
    "is_correct",
    "prompt_floor",
    "normalize_answer",
]

IGNORE_INDEX = -100


def _adds_bos(tokenizer: Any) -> bool:
    return getattr(tokenizer, "bos_token", None) is not None


def _encode_prompt_text(tokenizer: Any, prompt: str, add_special_tokens: bool | None = None) -> list[int]:
    special = _adds_bos(tokenizer) if add_special_tokens is None else add_special_tokens
    ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    eos = tokenizer.eos_token_id
    # Some tokenizers also append EOS with add_special_tokens=True; a prompt must not end the text.
    if ids and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids.pop()
    return ids


def _drop_leading_tokens(tokenizer: Any, text: str, k: int) -> str:
    """``text`` without its first ``k`` tokens (cut at a token boundary of the text alone)."""
    if k <= 0:
        return text
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        # Byte-fallback pieces of one character share its offsets: cut at the next real boundary.
        starts = [start for start, _ in offsets[k:] if start > 0]
        return text[starts[0] :].lstrip() if starts else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[k:]).lstrip() if k < len(ids) else ""


def fit_prompt(tokenizer: Any, prompt: str, budget: int, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``prompt`` using at most ``budget`` tokens.

    If the prompt is too long, tokens are removed from the left of the input text (between
    ``INPUT_MARK`` and the final ``ANSWER_MARK``) until it fits; the instruction and answer cue are
    kept. Raises :class:`DataError` if even an empty input does not fit. ``add_special_tokens``
    ``None`` adds the tokenizer's special tokens only if it has a BOS token (chat templates: False).
    """
    ids = _encode_prompt_text(tokenizer, prompt, add_special_tokens)
    if len(ids) <= budget:
        return ids
    start, end = prompt.find(INPUT_MARK), prompt.rfind(ANSWER_MARK)
    if start < 0 or end < start + len(INPUT_MARK):
        # Not one of our prompts: keep the end (answer cue) and drop from the left.
        return ids[len(ids) - budget :] if budget > 0 else []
    head, text, tail = prompt[: start + len(INPUT_MARK)], prompt[start + len(INPUT_MARK) : end], prompt[end:]
    drop = len(ids) - budget
    while text:
        shorter = _drop_leading_tokens(tokenizer, text, drop)
        text = shorter if len(shorter) < len(text) else text[1:]  # always make progress
        ids = _encode_prompt_text(tokenizer, head + text + tail, add_special_tokens)
        if len(ids) <= budget:
            return ids
        drop = max(1, len(ids) - budget)  # token merges at the cut can differ by a token or two
    raise DataError(
        f"max_length too small: the prompt without its input text needs {len(ids)} tokens but only "
        f"{budget} are available (prompt starts {prompt[:40]!r}); raise max_length"
    )


def prompt_floor(tokenizer: Any, prompt: str, max_length: int, add_special_tokens: bool | None = None) -> int:
    """Fewest tokens :func:`encode_for_training` cuts ``prompt`` to before it cuts the answer: the
    prompt without its input text (instruction and answer cue stay); for a prompt without an input
    slot (a chat conversation) its whole length, at most half of ``max_length``."""
    start, end = prompt.find(INPUT_MARK), prompt.rfind(ANSWER_MARK)
    if start < 0 or end < start + len(INPUT_MARK):
        return min(len(_encode_prompt_text(tokenizer, prompt, add_special_tokens)), max_length // 2)
    return len(_encode_prompt_text(tokenizer, prompt[: start + len(INPUT_MARK)] + prompt[end:], add_special_tokens))


def _cut(text: str, limit: int = 60) -> str:
    """A value quoted in a message, at most ``limit`` characters (a label may be a whole paragraph)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_for_training(
    tokenizer: Any, task: Task, example: Example, max_length: int, *, prompt_format: PromptFormat | None = None,
    max_source_length: int | None = None, max_target_length: int | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one example; ``labels`` is -100 on the prompt tokens.

    target ids = ``tokenizer(task.target(example), add_special_tokens=False)`` + ``[eos_token_id]``,
    all supervised. The prompt gets the tokenizer's own BOS handling (special tokens are added only
    if the tokenizer has a BOS token). ``prompt_format`` (default plain) renders prompt and answer.

    Lengths: by default prompt + answer fit ``max_length``: first the prompt's input text is cut
    from the left (down to :func:`prompt_floor`), then the answer from its end (its EOS first); a
    prompt whose floor leaves no answer token is a :class:`DataError` (a label word is never cut:
    a classification prompt that does not fit is). With ``max_source_length`` the prompt
    alone gets that many tokens and the answer at most ``max_target_length`` (the papers' separate
    source/target budgets).
    """
    fmt = prompt_format or PromptFormat()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token_id; set tokenizer.eos_token before encoding")
    target_ids = list(tokenizer(fmt.target(task, example), add_special_tokens=False)["input_ids"]) + [eos]
    if max_target_length is not None:
        target_ids = target_ids[:max_target_length]
    special = fmt.special_tokens(example)
    prompt = fmt.prompt(tokenizer, task, example)
    budget = max_source_length if max_source_length is not None else max_length - len(target_ids)
    if max_source_length is None and example.label not in task.labels:
        # Long answers (free-form, also inside a multi-task mix): the prompt is cut first, down to its floor; only then is
        # the answer cut from its end (EOS first), to what is left of max_length.
        floor = prompt_floor(tokenizer, prompt, max_length, special)
        if budget < floor:
            target_ids = target_ids[: max(0, max_length - floor)]
            budget = floor
    if not target_ids:  # a free-form answer after a prompt that takes the whole budget
        raise DataError(
            f"max_length={max_length} leaves no room for the answer of task {task.name} "
            f"(its prompt needs at least {budget} tokens even without its input text; answer "
            f"{_cut(repr(example.label))}); raise max_length"
        )
    if budget < 1:
        raise DataError(
            f"max_length={max_length} leaves no room for the prompt of task {task.name} "
            f"(answer {_cut(repr(example.label))} needs {len(target_ids)} tokens); raise max_length"
        )
    prompt_ids = fit_prompt(tokenizer, prompt, budget, special)
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def _check_free_form(tokenizer: Any, task: Task, max_length: int, fmt: PromptFormat,
                     max_source_length: int | None) -> None:
    """A free-form task fits when the prompt without its input text (:func:`prompt_floor`, once per
    distinct instruction) leaves at least one answer token within ``max_length`` (or fits
    ``max_source_length``); chat conversations always do (their floor is at most half the budget)."""
    instructions = {e.instruction for e in task.train + task.test if e.messages is None}
    for instruction in sorted(instructions, key=lambda i: i or ""):
        probe = Example("", "", instruction=instruction)
        floor = prompt_floor(tokenizer, fmt.prompt(tokenizer, task, probe), max_length, fmt.special_tokens(probe))
        if max_source_length is not None and floor > max_source_length:
            problem, setting = "more than max_source_length", "max_source_length"
        elif max_source_length is None and floor > max_length - 1:
            problem, setting = f"so max_length={max_length} leaves no token for the answer", "max_length"
        else:
            continue
        raise DataError(f"task {task.name}: its prompt without input text needs {floor} tokens (instruction "
                        f"{_cut(repr(instruction or task.instruction))}), {problem}; raise {setting} or shorten "
                        "the instruction")


def check_fits(
    tokenizer: Any, task: Task, max_length: int, *, prompt_format: PromptFormat | None = None,
    max_source_length: int | None = None, max_target_length: int | None = None,
) -> None:
    """Raise :class:`DataError`, naming the task, if some example of ``task`` could not be encoded
    within the budgets of :func:`encode_for_training` (training) or the prompt budget of evaluation.

    Only the fixed parts decide it (the input text is cut to fit): the instruction, which names the
    label words, the answer cue and the longest answer. Checked once before training rather than
    at the first batch or evaluation that meets the longest label. A free-form task (no label words)
    is checked by :func:`_check_free_form`."""
    fmt = prompt_format or PromptFormat()
    if not task.labels:
        _check_free_form(tokenizer, task, max_length, fmt, max_source_length)
        return

    def answer_tokens(label: str) -> int:
        return len(tokenizer(fmt.target(task, Example("", label)), add_special_tokens=False)["input_ids"])

    longest = max(task.labels, key=answer_tokens)
    probe = Example(text="x", label=longest)
    try:
        encode_for_training(tokenizer, task, probe, max_length, prompt_format=fmt,
                            max_source_length=max_source_length, max_target_length=max_target_length)
        fit_prompt(tokenizer, fmt.prompt(tokenizer, task, probe), max_source_length or max_length,
                   fmt.add_special_tokens)
    except DataError as err:
        longest_chars = max(len(label) for label in task.labels)
        raise DataError(
            f"task {task.name}: {err} (its instruction names its {len(task.labels)} label words, the longest "
            f"{longest_chars} characters; the longest answer takes {answer_tokens(longest) + 1} tokens); "
            "shorten the label words or raise the length budget"
        ) from None


def collate_training(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_for_training` outputs into ``input_ids``, ``attention_mask``
    and ``labels`` tensors (labels -100 on padding)."""
    if not batch:
        raise ValueError("collate_training needs at least one example")
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        if len(b["labels"]) != n:
            raise ValueError(
                f"example {i}: input_ids and labels differ in length ({n} vs {len(b['labels'])})"
            )
        input_ids[i, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(b["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode_prompts(tokenizer: Any, prompts: list[str], max_length: int,
                   add_special_tokens: bool | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for greedy generation.

    Each prompt is fitted into ``max_length`` tokens like the training prompts (the input text is
    cut from the left). The pad id is the tokenizer's pad token, else its EOS.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("tokenizer has neither pad_token_id nor eos_token_id; set one before evaluation")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    rows = [fit_prompt(tokenizer, p, max_length, add_special_tokens) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


_SPACES = re.compile(r"\s+")
_ASCII_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise a generation or label for exact-match scoring.

    Leading white space is dropped and the text is cut at the first newline (the model may go on
    after its answer); then lower case, punctuation (ASCII and Unicode) removed, white space collapsed.
    """
    text = text.lstrip().split("\n", 1)[0].lower()
    text = "".join(
        ch for ch in text if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P")
    )
    return _SPACES.sub(" ", text).strip()


def is_correct(generated: str, label: str) -> bool:
    """Exact match of the normalised generation against the normalised label word."""
    return normalize_answer(generated) == normalize_answer(label)
