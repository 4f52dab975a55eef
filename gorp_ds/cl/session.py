"""One method's model, optimizer and DeepSpeed engine, and the operations the runner composes:
train a task, evaluate all tasks, close a task, checkpoint, resume.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.config import DataConfig
from ..data.prompting import PromptFormat
from ..data.registry import load_eval_tasks
from ..data.sampling import global_batch_order, rank_slice, split_micro_batches
from ..data.tasks import Example, Task
from ..data.tokenize import check_fits, collate_training, encode_for_training
from ..export.hf_dir import ExportInfo, export_hf_dir
from ..faults import current as fault_plan
from ..log import get_logger, show_progress
from ..models import (
    add_lora,
    build_param_groups,
    load_model_and_tokenizer,
    merge_and_reinit_,
    method_spec,
    trainable_summary,
)
from ..models.kernels import AnswerLoss, answer_loss_for
from ..models.loading import DTYPES, fingerprint_mismatch, model_fingerprint
from ..models.lora import (
    init_lora_,
    lora_factor_names,
    lora_layers,
    lora_merge_record,
    merge_lora_,
    project_lora_a_off_,
    replay_lora_merges_,
    seed_lora_dropout,
)
from ..models.olora import OLoraPenalty
from ..optim import GORP
from ..optim.role_scheduler import RoleScheduler
from ..zero import CheckpointError, has_checkpoint, initialize, load_checkpoint, save_checkpoint
from . import preemption
from .config import RunConfig
from .evaluate import Evaluation, evaluate_row
from .lr_schedule import build_schedule, position
from .monitor import Monitor
from .nonfinite import NonFiniteError, NonFiniteGuard, poison_gradient
from .progress import Progress, tags_to_prune, task_number
from .run_dir import compare, describe_changes, recorded_settings
from .wandb_log import open_wandb, take_wandb_section

log = get_logger(__name__)


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
        # --eval-tasks: evaluated in every row after the trained tasks' columns, never trained
        # (nothing here or in train_task's schedule reaches them; their train split is dropped).
        self.eval_tasks = load_eval_tasks(cfg.data, tasks)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.checkpoint_dir = os.path.join(out_dir, "checkpoints")
        model, self.tokenizer = load_model_and_tokenizer(cfg.base_model)
        # Checkpoints hold no frozen weight: resume rebuilds the model and checks it is the same.
        self.base_fingerprint = model_fingerprint(model)
        torch.manual_seed(cfg.runner.seed)
        self.spec = method_spec(method)  # what the method trains and does at task boundaries
        if self.spec.adapters:
            model = add_lora(model, cfg.lora)
            init_lora_(model, cfg.runner.seed, 0)
        groups = build_param_groups(model, self.spec, cfg.targets, cfg.optimizer)
        log.info(f"[{method}] trainable: {trainable_summary(groups)}")
        self.optimizer = GORP(groups)
        self.optimizer.time_refreshes = cfg.runner.profile  # synchronised refresh timing only when profiling
        # This run's group hyperparameters (lr, weight decay, update gap, ...): loading a checkpoint
        # restores the saved ones, and resume() puts these back (see _apply_run_settings).
        self.run_group_settings = [{k: v for k, v in g.items() if k not in ("params", "names")}
                                   for g in self.optimizer.param_groups]
        self.guard = NonFiniteGuard(method, cfg.runner.max_bad_steps)
        self.settings = recorded_settings(cfg, ds_config, self.world)  # recorded in checkpoints
        ds_config, wandb_section = take_wandb_section(ds_config)  # the project writes to W&B, not DeepSpeed
        board = None
        if isinstance(ds_config.get("tensorboard"), dict):
            board = {**ds_config["tensorboard"], "job_name": method}
            # The monitor writes the event file itself (monitor.py says why), not DeepSpeed.
            ds_config["tensorboard"] = {**board, "enabled": False}
        self.engine, _, _, _ = initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                            full_gradients=cfg.targets.full_gradients, refresh_from=cfg.targets.refresh_from,
                                            refresh_memory_mib=cfg.targets.refresh_memory_mib)
        self.monitor = Monitor(self.engine, board, self.rank, open_wandb(wandb_section, method, self.rank, self.settings,
                                                                             out_dir=out_dir))
        # eager: the LM head then fp32 cross-entropy; fused (--kernels): Liger's, without the logits
        core = self.engine.module.get_base_model() if hasattr(self.engine.module, "get_base_model") else self.engine.module
        self.head_loss = answer_loss_for(core, core.get_output_embeddings())
        # The learning-rate schedule over GORP's groups (the ones every ZeRO stage's step reads),
        # one span per task trained; stepped after each optimizer step, positioned on resume.
        self.lr_spans = ([sum(map(self.steps_for, tasks))] if self.spec.mixed_tasks
                         else [self.steps_for(t) for t in tasks])
        self.lr_schedule = RoleScheduler(self.optimizer, build_schedule(cfg, self.lr_spans))
        self.accumulation = self.engine.gradient_accumulation_steps()
        self.old_lora_a: dict[str, list[torch.Tensor]] = {}  # o-lora: A (fp32 master) of every finished task
        # The method's loss penalty (MethodSpec.penalty), once there are finished tasks: a callable
        # returning a scalar added to the loss.
        self.penalty: Callable[[], torch.Tensor] | None = None
        # Per finished task, the LoRA factors merged into the frozen base weights (replayed on resume).
        self.merges: list[dict[str, dict[str, torch.Tensor]]] = []
        self.preemption = preemption.current()
        self.device = next(self.engine.module.parameters()).device
        self.prompt_format = PromptFormat(cfg.data.prompt_format)
        self.prompt_format.check(self.tokenizer)
        for task in tasks:  # an instruction or label too long for the budgets: refused before any training
            check_fits(self.tokenizer, task, cfg.data.max_length, prompt_format=self.prompt_format,
                       max_source_length=cfg.data.max_source_length, max_target_length=cfg.data.max_target_length)
        self._build_penalty()

    def _build_penalty(self) -> None:
        """The method's penalty for the task about to train, against the finished tasks' A's (o-lora's
        orthogonality regularisers)."""
        if self.spec.penalty is None:
            return
        penalty = self.spec.penalty(self.engine.module, self.old_lora_a, self.cfg.lora.olora_lambda, self.cfg.lora.olora_l2,
                                    self.device)
        self.penalty = penalty if penalty.active else None

    # ------------------------------------------------------------------ schedule
    def steps_for(self, task: Task) -> int:
        """Optimizer steps for a task; multi-task training gets the sum of all tasks' budgets."""
        if self.spec.mixed_tasks and task not in self.tasks:
            return sum(self.steps_for(t) for t in self.tasks)
        if self.cfg.runner.max_steps_per_task:
            return self.cfg.runner.max_steps_per_task
        return max(1, math.ceil(self.cfg.runner.epochs * len(task.train) / self.cfg.runner.global_batch_size))

    # ------------------------------------------------------------------ training
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = answer_loss(self.engine.module, batch, self.head_loss)
        if self.penalty is not None:
            loss = loss + self.penalty()
        return loss

    def _micro_batches(self, task: Task, indices: list[int]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches on the device, and the tokens of the whole step (all ranks,
        counted on the host so that logging needs no device sync)."""
        mine = rank_slice(indices, self.rank, self.world, self.accumulation)
        batches, tokens = [], 0
        for micro in split_micro_batches(mine, self.accumulation):
            batch = answer_batch(self.tokenizer, task, micro, self.cfg.data, self.prompt_format)
            tokens += int(batch["attention_mask"].sum()) * self.world
            batches.append({k: self._to_device(v) for k, v in batch.items()})
        return batches, tokens

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-device copy without a sync: a copy from pageable memory waits for the stream."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def train_task(self, task_index: int, task: Task, progress: Progress, on_checkpoint, total_tasks: int) -> None:
        steps = self.steps_for(task)
        order = global_batch_order(len(task.train), self.cfg.runner.global_batch_size, steps, self.cfg.runner.seed, task_index)
        faults = fault_plan()  # the tests' injected faults (gorp_ds/faults.py); empty in a real run
        number = task_number(task_index)
        first_step = progress.step  # after a resume mid-task, only the steps from here on run in this process
        bar = tqdm(total=steps, initial=first_step, desc=f"[{self.method}] task {number}/{total_tasks} {task.name}",
                   disable=not show_progress(), dynamic_ncols=True, mininterval=1.0)
        self.engine.module.train()
        overlap = self.penalty.overlap() if isinstance(self.penalty, OLoraPenalty) else None  # o-lora, for the log
        start = time.perf_counter()
        tokens = 0
        phases = PhaseTimer(self.device, self.cfg.runner.profile)
        stats = self.optimizer.stats  # device statistics are read every STATS_EVERY steps
        while progress.step < steps:
            step_start = time.perf_counter()
            losses = []
            if faults.drops(task_index, progress.step + 1):  # the reference run without this batch
                progress.step, progress.global_step = progress.step + 1, progress.global_step + 1
                self.lr_schedule.step()
                bar.update(1)
                continue
            with phases("data"):
                batches, step_tokens = self._micro_batches(task, order[progress.step])
            if self.spec.adapters and self.cfg.lora.dropout > 0:  # the step's masks: the same after a resume
                seed_lora_dropout(self.cfg.runner.seed, task_index, progress.step, self.rank)
            tokens += step_tokens
            poison = (poison_gradient(self.engine, self.optimizer, task_index, progress.step + 1)
                      if faults.poisons(task_index, progress.step + 1) else None)
            for index, batch in enumerate(batches):
                with phases("forward"):
                    loss = self._loss(batch)
                with phases("backward"):
                    self.engine.backward(loss)
                losses.append(loss.detach().float())
                if index == len(batches) - 1:
                    # --- non-finite check: the step's one host read (mean loss + all-ranks gradient flag);
                    # a bad step makes GORP.step a no-op.
                    with phases("logging"):
                        loss_value, finite = self.guard.check(
                            self.engine, self.optimizer, torch.stack(losses).mean(),
                            f"task {number}, step {progress.step + 1}")
                with phases("optimizer"):
                    self.engine.step()
            self.optimizer.skip_next_step = False  # DeepSpeed may skip GORP.step itself (fp32 overflow check)
            if poison is not None:
                poison.remove()
            progress.step += 1
            progress.global_step += 1
            if not finite:
                progress.skipped_steps += 1
                if self.guard.exhausted:
                    self._stop_nonfinite(task_index, progress, on_checkpoint)
            # --- end of the non-finite check
            with phases("logging"):
                # The step's loss was read by the non-finite check (the step's one device read).
                self.monitor.train_step(progress.global_step, loss_value, self.optimizer,
                                        tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9),
                                        step_seconds=time.perf_counter() - step_start,
                                        skipped_steps=progress.skipped_steps)
                if progress.step % STATS_EVERY == 0 or progress.step == steps:
                    stats = self._optimizer_stats(progress.global_step, stats)
                bar.set_postfix(loss=f"{loss_value:.3f}", refreshes=self.optimizer.refresh_count)
                bar.update(1)
            self.lr_schedule.step()  # after the step's lr was logged: the next step's rate
            faults.kill_point(task_index, progress.step)
            saved = False
            if self.cfg.runner.save_every and progress.step % self.cfg.runner.save_every == 0 and progress.step < steps:
                with phases("checkpoints"):
                    on_checkpoint(progress)
                saved = True
            # ---- pre-emption: every rank stops after this same step, with a checkpoint of it
            faults.signal_point(task_index, progress.step, self.rank)
            faults.pause_point(task_index, progress.step, self.rank, lambda: self.preemption.requested)
            if self.preemption.should_stop():
                bar.close()
                tag = progress.tag if saved else on_checkpoint(progress)
                raise preemption.Preempted(tag if self.cfg.runner.checkpoints else None)
        bar.close()
        elapsed = time.perf_counter() - start
        ran = progress.step - first_step
        resumed = f" (resumed at step {first_step} of {steps})" if first_step else ""
        log.info(f"[{self.method}] task {number}: {ran} step{'' if ran == 1 else 's'} in {elapsed:.1f} s{resumed}, "
                 f"{tokens / elapsed:,.0f} tokens/s ({phases.summary()}; refreshes "
                 f"{1000 * stats['refresh_seconds']:.0f} ms so far); trained on {task.name}")
        if overlap is not None:
            log.info(f"[{self.method}] task {number}: orthogonality Σ|A_old A_newᵀ| {overlap:.4g} at step {first_step}, "
                     f"{self.penalty.overlap():.4g} at the end (λ1 {self.cfg.lora.olora_lambda:g})")
        # Summed over the processes that trained this task (a resumed task's time is split).
        for key, value in ((f"train_s/{number}", elapsed), (f"tokens/{number}", tokens)):
            progress.timings[key] = progress.timings.get(key, 0.0) + value

    def _optimizer_stats(self, step: int, previous: dict[str, float | int]) -> dict[str, float | int]:
        """Read the optimizer's device statistics (refresh time, projector failures; warns about
        new failures) and write them to TensorBoard; every STATS_EVERY steps and at a task's end."""
        stats = self.optimizer.stats
        norm = self.engine.get_global_grad_norm() if self.monitor.enabled else None
        self.monitor.optimizer_stats(step, refresh_ms=1000 * (stats["refresh_seconds"] - previous["refresh_seconds"]),
                                     projector_failures=stats["projector_failures"],
                                     grad_norm=None if norm is None else float(norm))
        return stats

    def _stop_nonfinite(self, task_index: int, progress: Progress, on_checkpoint) -> None:
        """Too many bad steps in a row: checkpoint the last good state (the skipped steps changed
        nothing; the position is rewound to before them, within this task) and stop."""
        bad = self.guard.consecutive
        back = min(bad, progress.step)
        good = Progress(progress.task, progress.step - back, dict(progress.rows), dict(progress.timings),
                        progress.global_step - back, list(progress.changes), progress.skipped_steps - back)
        tag = on_checkpoint(good)
        where = (f"the last good state is checkpoint {os.path.join(self.checkpoint_dir, tag)} (--resume continues "
                 "from there)") if tag else "no checkpoint written (--checkpoints false)"
        raise NonFiniteError(
            f"[{self.method}] {bad} optimizer steps in a row had a non-finite loss or gradient (task {task_number(task_index)}, "
            f"steps {progress.step - bad + 1}-{progress.step}; each skipped); {where}. The run diverged: lower the "
            f"learning rate (--lr-lora {self.cfg.optimizer.lr_lora:g}, --lr-full {self.cfg.optimizer.lr_full:g}, --lr-plain "
            f"{self.cfg.optimizer.lr_plain:g}) or check the data; --max-bad-steps {self.cfg.runner.max_bad_steps} sets how many "
            "bad steps in a row are tolerated")

    # ------------------------------------------------------------------ evaluation and task boundary
    def evaluate(self) -> tuple[Evaluation, float]:
        """One row of R followed by the eval tasks' columns (and, on rank 0, the predictions when they
        are written)."""
        start = time.perf_counter()
        with self.engine.gorp.for_generation():  # ZeRO-3: the whole model gathered once, not per token
            result = evaluate_row(self.engine.module, self.tokenizer, [*self.tasks, *self.eval_tasks],
                                  **evaluation_settings(self.cfg), rank=self.rank, world=self.world)
        return result, time.perf_counter() - start

    def close_adapters(self, task_index: int) -> None:
        """docs/algorithm.md §4 step 2, before the task's row of R is measured: merge every LoRA into its base
        weight in fp32 from the fp32 masters (accumulated exactly in fp32 across tasks: a bf16 W keeps
        its low bits) and re-initialise it (B = 0, so the adapter adds exactly nothing). The row is
        then measured on exactly the weights an export writes. O-LoRA first remembers the finished task's A (its fp32 master: the value merged)."""
        if not self.spec.adapters:
            return
        module = self.engine.module
        masters = self._lora_masters()
        if self.spec.remembers_adapters:
            for name in lora_layers(module):
                self.old_lora_a.setdefault(name, []).append(masters[f"{name}.lora_A"].detach().cpu().clone())
            self._build_penalty()
        # The checkpoint stores this merge (the exact fp32 values merged), not the merged weights.
        self.merges.append(lora_merge_record(module, masters))
        with self._lora_layers_gathered():
            changed = merge_and_reinit_(module, self.cfg.runner.seed, task_index, masters)
        # A base weight that is itself trained (a full-rank target under a LoRA) has a master too.
        self.engine.gorp.masters_from_model(changed + self._trained_lora_bases())

    def _lora_masters(self) -> dict[str, torch.Tensor]:
        """Full fp32 masters of every LoRA factor (and of trained base weights), on every rank."""
        return self.engine.gorp.gather_masters(lora_factor_names(self.engine.module) + self._trained_lora_bases())

    def _trained_lora_bases(self) -> list[str]:
        return [name for name in lora_layers(self.engine.module) if name in self.engine.gorp.params_by_name]

    def _lora_layers_gathered(self):
        """Every LoRA layer's tensors (base weight, A, B) whole while changed in place identically on
        every rank; under ZeRO-3 they are written back into the partitions on exit (then the
        changed trainable tensors' masters are refreshed with ``masters_from_model``)."""
        params = [p for layer in lora_layers(self.engine.module).values() for p in layer.parameters()]
        return self.engine.gorp.gathered(params, modify=True)

    def end_task(self, task_index: int) -> dict[str, int]:
        """docs/algorithm.md §3–4 after the row of R: extend S from the moments and reset the optimizer;
        gorp then starts the new adapters' A off the shared space."""
        sizes = self.optimizer.end_task()
        if self.spec.lora_init_off_shared and self.cfg.lora.init_off_shared:
            shared = self._all_shared_spaces(".lora_A")
            with self._lora_layers_gathered():
                changed = project_lora_a_off_(self.engine.module, shared)
            self.engine.gorp.masters_from_model(changed)
        return sizes

    def merge_in_place(self) -> None:
        """Merge the current adapters into the base weights in fp32 from the masters without
        re-initialising them for training (evaluation of a mid-task checkpoint): B is zeroed."""
        if not self.spec.adapters:
            return
        module = self.engine.module
        masters = self._lora_masters()
        with self._lora_layers_gathered():
            merge_lora_(module, masters)
            for layer in lora_layers(module).values():
                for adapter in layer.lora_B:
                    layer.lora_B[adapter].weight.data.zero_()
        self.engine.gorp.masters_from_model([n for n in lora_factor_names(module) if n.endswith(".lora_B")]
                                            + self._trained_lora_bases())

    def export(self, directory: str) -> ExportInfo | None:
        """The model as a Hugging Face directory with every LoRA merged (all ranks call; rank 0 writes)."""
        return export_hf_dir(self.engine.module, self.engine.gorp, self.tokenizer, DTYPES[self.cfg.base_model.dtype], directory,
                             desc=f"[{self.method}] export {os.path.basename(directory)}")

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
        """Checkpoint (collective). Old tags are deleted only after the new one is committed, so
        ``--keep-checkpoints 1`` needs room for one checkpoint plus the one being written."""
        if not self.cfg.runner.checkpoints:
            return None
        tag = progress.tag
        client = {"progress": progress.to_state(), "method": self.method, "lora_merges": self.merges,
                  "base_model": self.base_fingerprint,
                  "run_config": self.cfg.to_sections(),  # what `python -m gorp_ds.export` rebuilds from
                  "config": self.settings,  # what --resume compares with this run
                  # the schedule at this checkpoint's position (a non-finite stop saves an earlier one)
                  "lr_schedule": {**self.lr_schedule.state_dict(), "position": position(self.lr_spans, progress)}}
        save_checkpoint(self.engine, self.checkpoint_dir, tag, client)
        if self.rank == 0:
            self._prune(keep=self.cfg.runner.keep_checkpoints, newest=tag)
        self.engine.gorp.barrier()
        return tag

    def _prune(self, keep: int, newest: str) -> None:
        folders = [d for d in os.listdir(self.checkpoint_dir) if os.path.isdir(os.path.join(self.checkpoint_dir, d))]
        for tag in tags_to_prune(folders, keep, newest):
            shutil.rmtree(os.path.join(self.checkpoint_dir, tag), ignore_errors=True)

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.checkpoint_dir)

    def resume(self, load_dir: str | None = None, tag: str | None = None, *, record_changes: bool = True) -> Progress:
        """Masters and optimizer state from the checkpoint (``load_dir``, default this method's
        checkpoints; ``tag``, default the latest complete one); frozen base weights from the model's
        source with the finished tasks' LoRA merges replayed (bit-exact: the same merge function
        on the same values). ``record_changes`` False (export, evaluation): the checkpoint is only
        read, so this session's settings are neither compared with the saved run nor recorded."""
        client = load_checkpoint(self.engine, load_dir or self.checkpoint_dir, tag)
        problem = fingerprint_mismatch(client.get("base_model", {}), self.base_fingerprint)
        if problem:
            raise CheckpointError(f"{self.checkpoint_dir}: the checkpoint was trained from another base model than "
                                  f"--model {self.cfg.base_model.model} ({problem}); resume with the model the run started with")
        self.merges = list(client.get("lora_merges", []))
        try:
            with self._lora_layers_gathered():
                replay_lora_merges_(self.engine.module, self.merges)
        except KeyError as err:
            raise CheckpointError(f"{self.checkpoint_dir}: {err.args[0]}; resume with the run's LoRA targets") from None
        if self.spec.remembers_adapters:  # the penalty's old adapters are the merged A's (stored once)
            self.old_lora_a = {}
            for record in self.merges:
                for name, merge in record.items():
                    self.old_lora_a.setdefault(name, []).append(merge["A"])
            self._build_penalty()
        progress = Progress.from_state(client["progress"])
        if record_changes:
            self._apply_run_settings(client.get("config"), progress)
            self._restore_schedule(client.get("lr_schedule"), progress)
        log.info(f"[{self.method}] resumed at task {progress.number}, step {progress.step}")
        return progress

    def _apply_run_settings(self, saved: dict[str, Any] | None, progress: Progress) -> None:
        """After loading: this run's group hyperparameters replace the checkpoint's (loading
        restored those), and every setting that differs from the checkpoint's run is recorded in
        ``progress.changes`` as changed here, old → new. A checkpoint of a different run (a
        FIXED_ON_RESUME field differs) is refused; config.yaml was checked at start already, this
        guards against an edited or foreign checkpoint."""
        for index, settings in enumerate(self.run_group_settings):  # detached (full) groups included
            self.optimizer.update_group(index, settings)
        if saved is None:
            log.warning(f"[{self.method}] the checkpoint records no run settings (older gorp_ds); "
                        "continuing with this run's settings, changes unrecorded")
            return
        refused, changed = compare(saved, self.settings)
        if refused:
            raise CheckpointError(f"{self.checkpoint_dir}: the checkpoint belongs to a different run ("
                                  + "; ".join(refused) + "); pass --overwrite or another --output-dir")
        for key, old, new in changed:
            progress.record_change(key, old, new)
        if changed:
            log.info(f"[{self.method}] changed at task {progress.number}, step {progress.step} (global step "
                     f"{progress.global_step}), applied from here: {describe_changes(changed)}")

    def _restore_schedule(self, saved: dict[str, Any] | None, progress: Progress) -> None:
        """The schedule continues at the checkpoint's position, with this run's base rates (the
        checkpoint load and ``_apply_run_settings`` left the groups at the saved or the base rates)."""
        expected = position(self.lr_spans, progress)
        if saved is None:  # a checkpoint of an older gorp_ds: the position follows from the progress
            self.lr_schedule.seek(expected)
            return
        if int(saved["position"]) != expected:
            # Each task's steps are fixed on resume; with --epochs they also follow the train splits.
            raise CheckpointError(f"{self.checkpoint_dir}: the checkpoint's learning-rate schedule is at step "
                                  f"{saved['position']} of the run, but its progress is step {expected} with this "
                                  "run's steps per task (did a task's train split change?); resume with the data "
                                  "the run started with, or pass --overwrite")
        self.lr_schedule.load_state_dict(saved)

    def close(self) -> None:
        self.monitor.close()
        self.engine.destroy()
        del self.engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def answer_batch(tokenizer: Any, task: Task, indices: list[int], data: DataConfig,
                 prompt_format: PromptFormat) -> dict[str, torch.Tensor]:
    """One micro-batch of ``task.train[i]`` for i in ``indices``, on the host: ``input_ids`` and
    ``attention_mask`` (``b × L``), the answer tokens' predicting positions ``answer_positions``
    (``a × 2``: row, column) and their targets ``answer_targets`` (``a``). The positions are found on
    the host: a boolean mask on the device would need a sync to size its result."""
    encoded = [encode_for_training(tokenizer, task, task.train[i], data.max_length, prompt_format=prompt_format,
                                   max_source_length=data.max_source_length, max_target_length=data.max_target_length)
               for i in indices]
    batch = collate_training(encoded, tokenizer.pad_token_id)
    targets = batch["labels"][:, 1:]  # position p predicts token p+1
    keep = targets != -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "answer_positions": keep.nonzero(), "answer_targets": targets[keep]}


def answer_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor], head_loss: AnswerLoss | None = None) -> torch.Tensor:
    """Cross-entropy on the answer tokens of an :func:`answer_batch` only (mean over them); the LM
    head runs on those positions alone (the vocabulary projection of every prompt position is most
    of a small model's cost). ``module``: the causal LM, PEFT-wrapped or not. ``head_loss``: the
    session's (gorp_ds/models/kernels.py; fused under ``--kernels``), else the eager head + loss."""
    core = module.get_base_model() if hasattr(module, "get_base_model") else module
    hidden = core.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows, cols = batch["answer_positions"].unbind(1)  # position p predicts token p+1
    if head_loss is not None:
        return head_loss(core.get_output_embeddings(), hidden[rows, cols], batch["answer_targets"])
    logits = core.get_output_embeddings()(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), batch["answer_targets"])


def evaluation_settings(cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate_row` a run's settings give (shared with --eval-only)."""
    return {"eval_samples": None, "batch_size": cfg.runner.eval_batch_size,
            "max_length": cfg.data.max_source_length or cfg.data.max_length, "prompt_format": PromptFormat(cfg.data.prompt_format),
            "max_new_tokens": cfg.data.max_target_length, "predictions": cfg.runner.predictions,
            "decoder": cfg.runner.eval_decoder}


class PromptedTask(Task):
    """A task whose examples already hold their full prompt (instruction included)."""

    def prompt(self, example: Example) -> str:
        return example.text


def mixed_task(tasks: list[Task]) -> Task:
    """Multi-task learning: every task's training examples, each with its own task's prompt."""
    train = [Example(task.prompt(ex), ex.label, messages=ex.messages) for task in tasks for ex in task.train]
    labels = tuple(sorted({label for task in tasks for label in task.labels}))
    return PromptedTask(name="all-tasks", labels=labels, instruction="", train=train, test=[])
