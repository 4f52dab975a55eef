"""One method's model, optimizer and DeepSpeed engine, and the operations the runner composes:
train a task, evaluate all tasks, close a task, checkpoint, resume.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.sampling import global_batch_order, rank_slice, split_micro_batches
from ..data.tasks import Example, Task
from ..data.tokenize import collate_training, encode_for_training
from ..log import get_logger
from ..models import (
    LoraSettings,
    ModelConfig,
    RoleConfig,
    add_lora,
    build_param_groups,
    load_model_and_tokenizer,
    merge_and_reinit_,
    trainable_summary,
)
from ..models.lora import init_lora_, lora_a_weights, orthogonality_loss, project_lora_a_off_
from ..models.roles import LORA_METHODS
from ..optim import GORP
from ..zero import initialize, load_checkpoint, save_checkpoint
from .config import RunConfig
from .evaluate import evaluate_tasks
from .monitor import Monitor

log = get_logger(__name__)
FAULT_ENV = "GORP_DS_FAULT_AT"  # "task,step": SIGKILL this process there (crash/resume tests)


@dataclass
class Progress:
    """Where a method's run stands; stored in every checkpoint (JSON-able)."""

    task: int = 0  # next task to train (index into the schedule)
    step: int = 0  # next step within that task
    rows: dict[int, list[float]] = field(default_factory=dict)  # R rows measured so far
    timings: dict[str, float] = field(default_factory=dict)
    global_step: int = 0

    def to_state(self) -> dict[str, Any]:
        return {"task": self.task, "step": self.step, "rows": {str(k): v for k, v in self.rows.items()},
                "timings": self.timings, "global_step": self.global_step}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(state["task"], state["step"], {int(k): v for k, v in state["rows"].items()},
                   dict(state["timings"]), state["global_step"])


STATS_EVERY = 10  # optimizer steps between reads of the optimizer's device statistics


class PhaseTimer:
    """Wall time per phase of a training step, device-synchronised at phase boundaries so that
    asynchronous GPU work is charged to the phase that launched it. Only when ``enabled``
    (``--profile``): the syncs (five per micro-batch) stall the GPU's queue; disabled, it times nothing."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        if not self.enabled:
            return "phase times: pass --profile"
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())


class MethodSession:
    def __init__(self, method: str, tasks: list[Task], cfg: RunConfig, ds_config: dict[str, Any], out_dir: str):
        self.method, self.tasks, self.cfg, self.out_dir = method, tasks, cfg, out_dir
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.checkpoint_dir = os.path.join(out_dir, "checkpoints")
        model, self.tokenizer = load_model_and_tokenizer(
            ModelConfig(cfg.model, cfg.dtype, cfg.gradient_checkpointing)
        )
        torch.manual_seed(cfg.seed)
        if method in LORA_METHODS:
            model = add_lora(model, LoraSettings(cfg.lora_r, cfg.lora_alpha, list(cfg.lora_targets)))
            init_lora_(model, cfg.seed, 0)
        roles = RoleConfig(list(cfg.full_targets), cfg.rank, cfg.update_gap, cfg.scale, cfg.projector,
                           cfg.shared_threshold, cfg.lr_lora, cfg.lr_full, cfg.lr_plain, cfg.weight_decay)
        groups = build_param_groups(model, method, roles)
        log.info(f"[{method}] trainable: {trainable_summary(groups)}")
        self.optimizer = GORP(groups)
        self.optimizer.time_refreshes = cfg.profile  # synchronised refresh timing only when profiling
        ds_config = {**ds_config}
        if isinstance(ds_config.get("tensorboard"), dict):
            ds_config["tensorboard"] = {**ds_config["tensorboard"], "job_name": method}
        self.engine, _, _, _ = initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                            full_gradients=cfg.full_gradients, refresh_from=cfg.refresh_from)
        self.monitor = Monitor(self.engine)
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.old_lora_a: dict[str, list[torch.Tensor]] = {}  # o-lora: A of every finished task
        self.device = next(self.engine.module.parameters()).device

    # ------------------------------------------------------------------ schedule
    def steps_for(self, task: Task) -> int:
        """Optimizer steps for a task; multi-task training gets the sum of all tasks' budgets."""
        if self.method == "mtl" and task not in self.tasks:
            return sum(self.steps_for(t) for t in self.tasks)
        if self.cfg.max_steps_per_task:
            return self.cfg.max_steps_per_task
        return max(1, math.ceil(self.cfg.epochs * len(task.train) / self.cfg.global_batch_size))

    # ------------------------------------------------------------------ training
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy on the answer tokens only; the LM head runs on those positions alone
        (the vocabulary projection of every prompt position is most of a small model's cost).
        The positions were found on the host (``_micro_batches``): a boolean mask on the device
        would need a sync to size its result."""
        module = self.engine.module
        core = module.get_base_model() if hasattr(module, "get_base_model") else module
        hidden = core.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows, cols = batch["answer_positions"].unbind(1)  # position p predicts token p+1
        logits = core.get_output_embeddings()(hidden[rows, cols])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["answer_targets"])
        if self.method == "o-lora" and self.old_lora_a and self.cfg.olora_lambda > 0:
            loss = loss + self.cfg.olora_lambda * orthogonality_loss(module, self.old_lora_a)
        return loss

    def _micro_batches(self, task: Task, indices: list[int]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches on the device, and the tokens of the whole step (all ranks,
        counted on the host so that logging needs no device sync)."""
        mine = rank_slice(indices, self.rank, self.world, self.accumulation)
        batches, tokens = [], 0
        for micro in split_micro_batches(mine, self.accumulation):
            encoded = [encode_for_training(self.tokenizer, task, task.train[i], self.cfg.max_length) for i in micro]
            batch = collate_training(encoded, self.tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum()) * self.world
            targets = batch["labels"][:, 1:]  # CPU: position p predicts token p+1
            keep = targets != -100
            batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                     "answer_positions": keep.nonzero(), "answer_targets": targets[keep]}
            batches.append({k: self._to_device(v) for k, v in batch.items()})
        return batches, tokens

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-device copy without a sync: a copy from pageable memory waits for the stream."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def train_task(self, task_index: int, task: Task, progress: Progress, on_checkpoint, total_tasks: int) -> None:
        steps = self.steps_for(task)
        order = global_batch_order(len(task.train), self.cfg.global_batch_size, steps, self.cfg.seed, task_index)
        fault = os.environ.get(FAULT_ENV)
        bar = tqdm(total=steps, initial=progress.step, desc=f"[{self.method}] task {task_index + 1}/{total_tasks} {task.name}",
                   disable=self.rank != 0, dynamic_ncols=True, mininterval=1.0)
        self.engine.module.train()
        start = time.perf_counter()
        tokens = 0
        phases = PhaseTimer(self.device, self.cfg.profile)
        stats = self.optimizer.stats  # device statistics are read every STATS_EVERY steps
        while progress.step < steps:
            step_start = time.perf_counter()
            losses = []
            with phases("data"):
                batches, step_tokens = self._micro_batches(task, order[progress.step])
            tokens += step_tokens
            for batch in batches:
                with phases("forward"):
                    loss = self._loss(batch)
                with phases("backward"):
                    self.engine.backward(loss)
                with phases("optimizer"):
                    self.engine.step()
                losses.append(loss.detach().float())
            progress.step += 1
            progress.global_step += 1
            with phases("logging"):
                # The step's one device read (loss, and the gradient norm for TensorBoard), at its end.
                loss_value, grad_norm = self._read_step_scalars(losses)
                self.monitor.train_step(progress.global_step, loss_value, self.optimizer, grad_norm=grad_norm,
                                        tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9),
                                        step_seconds=time.perf_counter() - step_start)
                if progress.step % STATS_EVERY == 0 or progress.step == steps:
                    stats = self._optimizer_stats(progress.global_step, stats)
                bar.set_postfix(loss=f"{loss_value:.3f}", refreshes=self.optimizer.refresh_count)
                bar.update(1)
            if fault == f"{task_index},{progress.step}":
                os.kill(os.getpid(), 9)
            if self.cfg.save_every and progress.step % self.cfg.save_every == 0 and progress.step < steps:
                with phases("checkpoints"):
                    on_checkpoint(progress)
        bar.close()
        elapsed = time.perf_counter() - start
        log.info(f"[{self.method}] task {task_index + 1}: {steps} steps in {elapsed:.1f} s "
                 f"({phases.summary()}; refreshes {1000 * stats['refresh_seconds']:.0f} ms so far), "
                 f"{tokens / elapsed:,.0f} tokens/s")
        progress.timings[f"train_s/{task_index}"] = progress.timings.get(f"train_s/{task_index}", 0.0) + elapsed
        progress.timings[f"tokens/{task_index}"] = progress.timings.get(f"tokens/{task_index}", 0.0) + tokens

    def _read_step_scalars(self, losses: list[torch.Tensor]) -> tuple[float, float | None]:
        """Mean loss of the step's micro-batches and, when TensorBoard is on, the gradient norm:
        one device-to-host read for both (the only per-step synchronisation of training)."""
        values = [torch.stack(losses).mean()]
        norm = self.engine.get_global_grad_norm() if self.monitor.enabled else None
        if isinstance(norm, torch.Tensor):
            values.append(norm.detach().float().reshape(()).to(values[0].device))
        read = torch.stack(values).tolist()
        return read[0], (read[1] if len(read) > 1 else (float(norm) if norm is not None else None))

    def _optimizer_stats(self, step: int, previous: dict[str, float | int]) -> dict[str, float | int]:
        """Read the optimizer's device statistics (refresh time, projector failures; warns about
        new failures) and write them to TensorBoard; every STATS_EVERY steps and at a task's end."""
        stats = self.optimizer.stats
        self.monitor.optimizer_stats(step, refresh_ms=1000 * (stats["refresh_seconds"] - previous["refresh_seconds"]),
                                     projector_failures=stats["projector_failures"])
        return stats

    # ------------------------------------------------------------------ evaluation and task boundary
    def evaluate(self) -> tuple[list[float], float]:
        start = time.perf_counter()
        row = evaluate_tasks(self.engine.module, self.tokenizer, self.tasks, eval_samples=None,
                             batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                             rank=self.rank, world=self.world)
        return row, time.perf_counter() - start

    def end_task(self, task_index: int) -> dict[str, int]:
        """GORP.md §4: extend S from the moments and reset the optimizer, merge LoRA into the base
        weights and re-initialise it (O-LoRA first remembers the finished task's A)."""
        if self.method == "o-lora":
            for name, a in lora_a_weights(self.engine.module).items():
                self.old_lora_a.setdefault(name, []).append(a.cpu())
        sizes = self.optimizer.end_task()
        if self.method in LORA_METHODS:
            changed = merge_and_reinit_(self.engine.module, self.cfg.seed, task_index)
            if self.method == "gorp" and self.cfg.lora_init_off_shared:
                project_lora_a_off_(self.engine.module, self._all_shared_spaces(".lora_A"))
            self.engine.gorp.masters_from_model(changed)
        return sizes

    def _all_shared_spaces(self, suffix: str) -> dict[str, torch.Tensor]:
        """S of every tensor whose name ends with ``suffix``, from whichever rank holds it."""
        local = {n: s.cpu() for n, s in self.optimizer.shared.items() if n.endswith(suffix)}
        if self.world == 1:
            return local
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, local)
        return {n: s for part in gathered for n, s in part.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self, progress: Progress) -> str | None:
        if not self.cfg.checkpoints:
            return None
        tag = f"task{progress.task:02d}_step{progress.step:06d}"
        client = {"progress": progress.to_state(), "old_lora_a": self.old_lora_a, "method": self.method}
        save_checkpoint(self.engine, self.checkpoint_dir, tag, client)
        if self.rank == 0:
            self._prune(keep=self.cfg.keep_checkpoints, newest=tag)
        self.engine.gorp.barrier()
        return tag

    def _prune(self, keep: int, newest: str) -> None:
        tags = sorted(d for d in os.listdir(self.checkpoint_dir)
                      if os.path.isdir(os.path.join(self.checkpoint_dir, d)) and d.startswith("task"))
        for tag in tags[:-keep]:
            if tag != newest:
                shutil.rmtree(os.path.join(self.checkpoint_dir, tag), ignore_errors=True)

    def has_checkpoint(self) -> bool:
        return os.path.isfile(os.path.join(self.checkpoint_dir, "latest"))

    def resume(self) -> Progress:
        client = load_checkpoint(self.engine, self.checkpoint_dir)
        self.old_lora_a = client.get("old_lora_a", {})
        progress = Progress.from_state(client["progress"])
        log.info(f"[{self.method}] resumed at task {progress.task + 1}, step {progress.step}")
        return progress

    def close(self) -> None:
        self.engine.destroy()
        del self.engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class PromptedTask(Task):
    """A task whose examples already hold their full prompt (instruction included)."""

    def prompt(self, example: Example) -> str:
        return example.text


def mixed_task(tasks: list[Task]) -> Task:
    """Multi-task learning: every task's training examples, each with its own task's prompt."""
    train = [Example(task.prompt(ex), ex.label) for task in tasks for ex in task.train]
    labels = tuple(sorted({label for task in tasks for label in task.labels}))
    return PromptedTask(name="all-tasks", labels=labels, instruction="", train=train, test=[])
