"""Every task's own metric by greedy generation, sharded across ranks (one row of R).

Each rank generates answers for every ``world``-th test example of every task; the scores of the
task's metric (gorp_ds/data/metrics.py; accuracy: correct counts) are summed over ranks with one
all-reduce; the generations themselves can be gathered to rank 0 for the predictions files. For
classification an answer is correct when the normalised generation
(lower case, punctuation and surplus white space removed, cut at the first newline) equals the
normalised label (docs/algorithm.md §7). Decoding is greedy, by transformers' generate() or by our
own loop (:data:`DECODERS`, ``--eval-decoder``): the same tokens either way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.metrics import TASK_METRICS
from ..data.prompting import PromptFormat
from ..data.task_files import DEFAULT_NEW_TOKENS
from ..data.tasks import Example, Task
from ..data.tokenize import encode_prompts, normalize_answer


def _core(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (its LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def hf_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos_token_id: int, pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding of a left-padded ``B × L`` batch by transformers' ``generate()`` (KV cache,
    the LM head on the last position only): ``B × n`` new tokens, ``n <= max_new_tokens`` (it stops
    when every row has ended); after a row's end-of-sequence token come ``pad_token_id``s (default:
    the end-of-sequence id).

    Only the settings given here decide the result: the model's own ``generation_config`` (a
    checkpoint's ``generation_config.json`` may hold a temperature, ``max_length`` or a repetition
    penalty) fills every setting a call leaves unset, so it is swapped for this call's, which
    also keeps generate() from warning about sampling flags under greedy decoding.
    ``synced_gpus=False``: under ZeRO-3 the caller has gathered the whole model first
    (``Distributor.for_generation``), so a rank's forward passes need no other rank.
    """
    from transformers import GenerationConfig

    pad = eos_token_id if pad_token_id is None else pad_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                              eos_token_id=eos_token_id, pad_token_id=pad)
    core = _core(model)
    saved = core.generation_config
    core.generation_config = config
    head = core.get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        out = core.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            synced_gpus=False)  # B × (L + n)
    finally:
        core.generation_config = saved
        if hook is not None:
            hook.remove()
    return out[:, input_ids.shape[1]:]


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The LM head's input made contiguous. generate()'s first step hands the head the prompt's last
    positions as a strided ``B × 1 × hidden`` slice of ``B × L × hidden``; on a CPU, a linear layer
    whose weight is frozen (the base model's, under LoRA) runs such a bf16 input as a batched matmul
    over a ``B``-fold copy of the ``vocab × hidden`` weight: 2.7 s and 3.6 GB for the embedded model
    at B = 64, against 8 ms for the contiguous ``B × 1 × hidden`` copy made here (a few KB)."""
    return (args[0].contiguous(), *args[1:])


@functools.cache
def _cache_argument(forward_class: type) -> str:
    """The decoder's name for its KV cache: newer transformers call it ``cache`` (argument and
    output field) and warn on the old name ``past_key_values``; older ones know only the old name."""
    return "cache" if "cache" in inspect.signature(forward_class.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int, pad_token_id: int | None = None) -> torch.Tensor:
    """The same decoding as :func:`hf_generate` (the tests compare them token for token) by a loop
    of our own (``--eval-decoder loop``, kept for bench/eval_throughput.py's comparison).

    It calls the decoder directly and runs the LM head only on each row's last position, as one
    contiguous ``B × hidden`` matrix (generate() hands the head a strided ``B × 1 × hidden`` slice).
    """
    core = _core(model)
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    cache_arg = _cache_argument(type(decoder))
    pad = eos_token_id if pad_token_id is None else pad_token_id
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # B × L, left padding aware
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    mask, position = attention_mask, positions[:, -1:]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = head(out.last_hidden_state[:, -1, :].contiguous()).argmax(-1)  # B
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        finished |= token == eos_token_id
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                      **{cache_arg: getattr(out, cache_arg)})
    return torch.stack(tokens, dim=1)


# --eval-decoder: both give the same tokens; bench/eval_throughput.py measures which is faster.
# generate() is the default: the two ran within ±5 % of each other on an H200 and on a CPU
# (bench/results/eval_throughput_*.md), and it is the library's maintained decoder.
DECODERS: dict[str, Callable[..., torch.Tensor]] = {"generate": hf_generate, "loop": greedy_generate}
DECODER_CHOICES: tuple[str, ...] = tuple(DECODERS)
DEFAULT_DECODER = "generate"


def _label_budget(tokenizer, task: Task, fmt: PromptFormat) -> int:
    """New tokens to generate: the longest label (as the answer is written) plus end-of-sequence;
    a free-form task without a declared length gets task_files.DEFAULT_NEW_TOKENS."""
    if not task.labels:
        return DEFAULT_NEW_TOKENS
    longest = max(len(tokenizer(fmt.target(task, Example("", label)), add_special_tokens=False)["input_ids"])
                  for label in task.labels)
    return longest + 1


@dataclass
class Evaluation:
    """One row of R and, on rank 0 (when asked for), every task's predictions in test-set order:
    ``{"index", "input", "label", "generation", "prediction", "correct", "score"}`` per example
    (``label``: the reference answer; ``score``: the task's metric, 0-100; ``correct``: score 100)."""

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
    decoder: str = DEFAULT_DECODER,
) -> Evaluation:
    """Each task's own metric (``task.metric``, 0-100; accuracy for classification), averaged over its
    test examples: one number per task. ``max_length`` is the prompt budget; the generation budget is
    the task's declared ``max_new_tokens``, else ``max_new_tokens``, else the longest label + 1. With
    ``predictions`` every rank's generations are gathered to rank 0 and put in test-set order.
    ``decoder`` names the decoding (:data:`DECODERS`)."""
    device = next(model.parameters()).device
    generate = DECODERS[decoder]
    fmt = prompt_format or PromptFormat()
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(tasks), 2, dtype=torch.float64)  # sum of score/100 (correct answers), total
    local: list[list[dict[str, Any]]] = []
    for index, task in enumerate(tasks):
        examples = task.test[:eval_samples] if eval_samples else task.test
        mine = list(range(rank, len(examples), world))
        budget = task.max_new_tokens or max_new_tokens or _label_budget(tokenizer, task, fmt)
        metric = TASK_METRICS[task.metric].score
        records = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompts = [fmt.prompt(tokenizer, task, examples[i]) for i in chunk]
            batch = encode_prompts(tokenizer, prompts, max_length, fmt.special_tokens(examples[chunk[0]]))
            batch = {k: v.to(device) for k, v in batch.items()}
            # A row that has ended is filled with EOS (pad_token_id left unset): decoding skips it as it
            # skips the EOS itself, whatever the tokenizer's pad token is.
            new_tokens = generate(model, batch["input_ids"], batch["attention_mask"], budget, tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                score = metric(text, examples[i].label)
                # score / 100 sums to the count of correct answers for accuracy (as exact as before)
                counts[index, 0] += score / 100.0
                if predictions:
                    records.append({"index": i, "input": examples[i].text, "label": examples[i].label,
                                    "generation": text, "prediction": normalize_answer(text),
                                    "correct": score == 100.0, "score": score})
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
