"""Accuracy of every task by greedy generation, sharded across ranks (one row of R).

Each rank generates answers for every ``world``-th test example of every task; correct counts are
summed over ranks with one all-reduce. An answer is correct when the normalised generation
(lower case, punctuation and surplus white space removed, cut at the first newline) equals the
normalised label (GORP.md §7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..data.tasks import Task
from ..data.tokenize import encode_prompts, is_correct


def _label_budget(tokenizer, task: Task) -> int:
    """New tokens to generate: the longest label (with its leading space) plus end-of-sequence."""
    longest = max(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in task.labels)
    return longest + 1


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[Task],
    *,
    eval_samples: int | None,
    batch_size: int,
    max_length: int,
    rank: int = 0,
    world: int = 1,
) -> list[float]:
    """Accuracy in percent for each task (macro: one number per task)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(tasks), 2, dtype=torch.float64)  # correct, total
    for index, task in enumerate(tasks):
        examples = task.test[:eval_samples] if eval_samples else task.test
        mine = examples[rank::world]
        budget = _label_budget(tokenizer, task)
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = encode_prompts(tokenizer, [task.prompt(e) for e in chunk], max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(
                **batch, max_new_tokens=budget, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            counts[index, 0] += sum(is_correct(text, e.label) for text, e in zip(texts, chunk))
            counts[index, 1] += len(chunk)
    if world > 1 and dist.is_initialized():
        reduced = counts.to(device=device, dtype=torch.float32)
        dist.all_reduce(reduced)
        counts = reduced.double().cpu()
    if was_training:
        model.train()
    return [round(100.0 * float(c / t), 4) if t > 0 else 0.0 for c, t in counts.tolist()]
