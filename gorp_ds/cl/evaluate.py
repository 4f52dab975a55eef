"""Accuracy of every task by greedy generation, sharded across ranks (one row of R).

Each rank generates answers for every ``world``-th test example of every task; correct counts are
summed over ranks with one all-reduce; the generations themselves can be gathered to rank 0 for
the predictions files. An answer is correct when the normalised generation
(lower case, punctuation and surplus white space removed, cut at the first newline) equals the
normalised label (docs/algorithm.md §7).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.prompting import PromptFormat
from ..data.tasks import Example, Task
from ..data.tokenize import encode_prompts, is_correct, normalize_answer


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int) -> torch.Tensor:
    """Greedy decoding of a left-padded batch: ``B × n`` new tokens (``n <= max_new_tokens``;
    after a row's end-of-sequence token it repeats that token).

    Equivalent to ``generate(do_sample=False)`` (the tests compare them token for token) but runs
    the LM head only on each row's last position, as one contiguous ``B × hidden`` matrix: the
    strided slice that ``generate`` hands the head hits a slow bf16 path on CPUs (6× the whole
    forward pass), and answers here are only a few tokens long.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    # Newer transformers name the cache `cache` (argument and output field) and warn, once per
    # process, on the old name `past_key_values`; older ones know only `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # B × L, left padding aware
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    mask, position = attention_mask, positions[:, -1:]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = head(out.last_hidden_state[:, -1, :].contiguous()).argmax(-1)  # B
        token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        tokens.append(token)
        finished |= token == eos_token_id
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                      **{cache_arg: getattr(out, cache_arg)})
    return torch.stack(tokens, dim=1)


def _label_budget(tokenizer, task: Task, fmt: PromptFormat) -> int:
    """New tokens to generate: the longest label (as the answer is written) plus end-of-sequence."""
    longest = max(len(tokenizer(fmt.target(task, Example("", label)), add_special_tokens=False)["input_ids"])
                  for label in task.labels)
    return longest + 1


@dataclass
class Evaluation:
    """One row of R and, on rank 0 (when asked for), every task's predictions in test-set order:
    ``{"index", "input", "label", "generation", "prediction", "correct"}`` per example."""

    row: list[float]
    predictions: list[list[dict[str, Any]]] | None = None


@torch.no_grad()
def evaluate_row(
    model: nn.Module,
    tokenizer,
    tasks: list[Task],
    *,
    eval_samples: int | None,
    batch_size: int,
    max_length: int,
    rank: int = 0,
    world: int = 1,
    prompt_format: PromptFormat | None = None,
    max_new_tokens: int | None = None,
    predictions: bool = False,
) -> Evaluation:
    """Accuracy in percent for each task (macro: one number per task). ``max_length`` is the prompt
    budget; ``max_new_tokens`` (default: the longest label + 1) the generation budget. With
    ``predictions`` every rank's generations are gathered to rank 0 and put in test-set order."""
    fmt = prompt_format or PromptFormat()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(tasks), 2, dtype=torch.float64)  # correct, total
    local: list[list[dict[str, Any]]] = []
    for index, task in enumerate(tasks):
        examples = task.test[:eval_samples] if eval_samples else task.test
        mine = list(range(rank, len(examples), world))
        budget = max_new_tokens or _label_budget(tokenizer, task, fmt)
        records = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompts = [fmt.prompt(tokenizer, task, examples[i]) for i in chunk]
            batch = encode_prompts(tokenizer, prompts, max_length, fmt.add_special_tokens)
            batch = {k: v.to(device) for k, v in batch.items()}
            new_tokens = greedy_generate(model, batch["input_ids"], batch["attention_mask"], budget,
                                         tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                correct = is_correct(text, examples[i].label)
                counts[index, 0] += correct
                if predictions:
                    records.append({"index": i, "input": examples[i].text, "label": examples[i].label,
                                    "generation": text, "prediction": normalize_answer(text), "correct": correct})
            counts[index, 1] += len(chunk)
        local.append(records)
    distributed = world > 1 and dist.is_initialized()
    if distributed:
        reduced = counts.to(device=device, dtype=torch.float32)
        dist.all_reduce(reduced)
        counts = reduced.double().cpu()
    ordered = None
    if predictions:
        parts: list[Any] = [None] * world
        if distributed:
            dist.all_gather_object(parts, local)
        else:
            parts = [local]
        if rank == 0:
            ordered = [sorted((r for part in parts for r in part[t]), key=lambda r: r["index"])
                       for t in range(len(tasks))]
    if was_training:
        model.train()
    row = [round(100.0 * float(c / t), 4) if t > 0 else 0.0 for c, t in counts.tolist()]
    return Evaluation(row, ordered)
