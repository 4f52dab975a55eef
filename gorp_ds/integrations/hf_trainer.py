"""GORP as the optimizer of a ``transformers.Trainer``, over a sequence of tasks in one process.

:class:`GorpTrainer` builds what the runner's :class:`~gorp_ds.cl.session.MethodSession` builds for
a method (LoRA through PEFT with the seeded init, the method's parameter groups, ``GORP``) and
hands ``GORP`` to ``Trainer`` as its optimizer. One ``train()`` per task; between tasks
:meth:`GorpTrainer.end_task` closes the task as the runner does (docs/algorithm.md §4), with the
same functions: the LoRA merge in fp32 and re-init (``merge_and_reinit_``), S grown from Adam's
first moments and the optimizer reset (``GORP.end_task``), the new A started off S
(``project_lora_a_off_``). :meth:`GorpTrainer.train_tasks` runs the whole sequence.

Any dataset and collator the Trainer takes work (the model's own loss). :class:`AnswerBatches`
gives instead the runner's micro-batches of a task in the runner's order, with the runner's loss
(cross-entropy on the answer tokens, ``answer_loss``): with those, fp32 and the same settings,
the trained weights and S equal the runner's (tests/integration/test_hf_trainer.py).

Not under ``TrainingArguments(deepspeed=...)``: the Trainer gives its optimizer to accelerate,
which builds the engine with ``deepspeed.initialize``. DeepSpeed's ZeRO optimizer would then step
GORP on flattened fp32 partitions, without what ``gorp_ds.initialize`` installs: the distributor
that maps partition slices back to GORP's named tensors and holds the fp32 masters the task
boundary merges from, and the projected full-rank targets claimed before DeepSpeed sees the model.
The result would not be GORP, so it is refused; ZeRO runs go through ``gorp-ds train`` (or
``gorp_ds.initialize`` in a loop of one's own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput

from ..cl.session import answer_batch, answer_loss
from ..data.config import DataConfig
from ..data.prompting import PromptFormat
from ..data.sampling import global_batch_order, rank_slice, split_micro_batches
from ..data.tasks import Task
from ..export.hf_dir import export_hf_dir
from ..log import get_logger
from ..models import add_lora, build_param_groups, merge_and_reinit_, method_spec
from ..models.lora import (
    LoraSettings,
    init_lora_,
    lora_factor_names,
    lora_layers,
    lora_merge_record,
    project_lora_a_off_,
)
from ..models.methods import MethodSpec
from ..models.roles import TargetsConfig
from ..optim import GORP
from ..optim.config import OptimizerConfig
from ..zero import UnsupportedSetupError
from ..zero.config_checks import trainable_by_name
from ..zero.distributor.local import LocalDistributor

log = get_logger(__name__)

DEEPSPEED_REFUSAL = ("GorpTrainer does not run under TrainingArguments(deepspeed=...): the Trainer builds the "
                     "DeepSpeed engine with deepspeed.initialize, which steps GORP on flat ZeRO partitions without "
                     "gorp_ds.initialize's distributor and fp32 masters; use `gorp-ds train --ds_config ...` for "
                     "ZeRO, or GorpTrainer without deepspeed= in one process")


def check_trainer_setup(args: TrainingArguments, spec: MethodSpec, optimizer: OptimizerConfig | None = None) -> None:
    """What GorpTrainer refuses, before anything is built: DeepSpeed through the Trainer (see the
    module's docstring), the methods whose boundary or loss the Trainer path does not carry, and the
    runner's own learning-rate schedule (the Trainer schedules: it would be ignored)."""
    if getattr(args, "deepspeed", None):
        raise UnsupportedSetupError(DEEPSPEED_REFUSAL)
    schedule = getattr(optimizer, "lr_schedule", "constant")
    if schedule != "constant":
        raise ValueError(f"GorpTrainer: OptimizerConfig(lr_schedule={schedule!r}) is the runner's schedule; the "
                         "Trainer schedules the rates itself: set TrainingArguments(lr_scheduler_type=...) instead")
    if spec.penalty is not None or spec.mixed_tasks:
        raise ValueError(f"GorpTrainer: method {spec.name!r} ({spec.summary}) needs the runner's "
                         f"{'loss penalty' if spec.penalty is not None else 'mixed task'}; use `gorp-ds train "
                         f"--method {spec.name}`, or one of gorp, galore, seq-lora, seq-ft here")


class AnswerBatches(Dataset):
    """The runner's micro-batches of one task on one rank, in its order: step ``s`` of ``global_batch_order``
    split into ``global_batch_size / micro_batch_size`` micro-batches (each an :func:`answer_batch`).
    Item ``i`` is micro-batch ``i % accumulation`` of step ``i // accumulation``; give the Trainer
    ``per_device_train_batch_size = micro_batch_size``, ``gradient_accumulation_steps =
    accumulation`` and ``max_steps = steps``."""

    def __init__(self, task: Task, tokenizer: Any, data: DataConfig, *, global_batch_size: int, micro_batch_size: int,
                 steps: int, seed: int, task_index: int) -> None:
        if global_batch_size % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} is not a multiple of the micro batch {micro_batch_size}")
        self.task, self.tokenizer, self.data = task, tokenizer, data
        self.accumulation = global_batch_size // micro_batch_size
        self.prompt_format = PromptFormat(data.prompt_format)
        order = global_batch_order(len(task.train), global_batch_size, steps, seed, task_index)
        self.micro = [micro for step in order
                      for micro in split_micro_batches(rank_slice(step, 0, 1, self.accumulation), self.accumulation)]

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return answer_batch(self.tokenizer, self.task, self.micro[index], self.data, self.prompt_format)


class GorpTrainer(Trainer):
    """A ``Trainer`` whose optimizer is GORP over the method's parameter groups, with task boundaries.

    ``model``: the causal LM (not yet PEFT-wrapped); ``method``: a registered method of
    :mod:`gorp_ds.models.methods` without a loss penalty or mixed tasks (gorp, galore, seq-lora,
    seq-ft); ``lora``, ``targets``, ``optimizer``: the runner's settings sections (defaults: theirs);
    ``seed``: LoRA's init (the runner's ``--seed``). The learning rates are the groups' (``lr_lora``,
    ``lr_full``, ``lr_plain``), as are betas, eps and weight decay: ``args.learning_rate`` and
    ``args.weight_decay`` are not read, and ``args.lr_scheduler_type`` scales every group's rate
    (the runner's default ``--lr-schedule constant`` is ``"constant"``). Other keyword arguments go to ``Trainer``."""

    def __init__(self, model: nn.Module, args: TrainingArguments, *, method: str = "gorp",
                 lora: LoraSettings | None = None, targets: TargetsConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0, **kwargs: Any) -> None:
        spec = method_spec(method)
        check_trainer_setup(args, spec, optimizer)
        if "optimizers" in kwargs or "optimizer_cls_and_kwargs" in kwargs:
            raise ValueError("GorpTrainer builds its optimizer (GORP); do not pass optimizers= or optimizer_cls_and_kwargs=")
        self.spec, self.seed, self.lora_settings = spec, seed, lora or LoraSettings()
        torch.manual_seed(seed)  # as the runner's session: PEFT's own init draws from it (then re-drawn, seeded)
        if spec.adapters:
            model = add_lora(model, self.lora_settings)
            init_lora_(model, seed, 0)
        self.gorp = GORP(build_param_groups(model, spec, targets, optimizer))
        # One process: whole tensors, the parameters their own fp32 masters (what the runner's ZeRO
        # distributor gathers at a boundary).
        self.distributor = LocalDistributor(self.gorp, trainable_by_name(self.gorp.param_groups))
        self.task_index = 0  # tasks finished
        self.merges: list[dict[str, dict[str, torch.Tensor]]] = []  # per finished task, the LoRA merged
        super().__init__(model=model, args=args, optimizers=(self.gorp, None), **kwargs)

    # ------------------------------------------------------------------ data and loss
    def get_train_dataloader(self) -> DataLoader:
        if isinstance(self.train_dataset, AnswerBatches):
            # Each item is a whole micro-batch, already in the runner's order: no sampler, no collation.
            return DataLoader(self.train_dataset, batch_size=None, shuffle=False)
        return super().get_train_dataloader()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "answer_positions" not in inputs:  # any other batch: the model's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # The runner's loss, a mean per micro-batch; the Trainer divides it by the accumulation steps
        # (no "labels" in the batch, so no token count), as DeepSpeed does in the runner.
        loss = answer_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ task boundaries
    @torch.no_grad()
    def end_task(self) -> dict[str, int]:
        """Close the task just trained (docs/algorithm.md §4, the runner's
        ``MethodSession.close_adapters`` then ``end_task``): merge every LoRA into its base weight in
        fp32 from the masters and re-draw the factors for the next task; extend S from the first
        moments and reset the optimizer; start the new A off S (gorp). Returns ``{name: columns of S}``."""
        module = self.model
        if self.spec.adapters:
            trained_bases = [name for name in lora_layers(module) if name in self.distributor.params_by_name]
            masters = self.distributor.gather_masters(lora_factor_names(module) + trained_bases)
            self.merges.append(lora_merge_record(module, masters))
            merge_and_reinit_(module, self.seed, self.task_index, masters)
        sizes = self.gorp.end_task()
        if self.spec.lora_init_off_shared and self.lora_settings.init_off_shared:
            project_lora_a_off_(module, {n: s for n, s in self.gorp.shared.items() if n.endswith(".lora_A")})
        self.task_index += 1
        log.info(f"[{self.spec.name}] task {self.task_index} closed; S columns: {sum(sizes.values())} over {len(sizes)} tensors")
        return sizes

    def export(self, directory: str, dtype: torch.dtype = torch.float32) -> None:
        """The model as a Hugging Face directory with every LoRA merged (the runner's ``export/``)."""
        export_hf_dir(self.model, self.distributor, self.processing_class, dtype, directory, desc="export")

    def train_tasks(self, datasets: Sequence[Dataset],
                    after_task: Callable[[GorpTrainer, int], None] | None = None) -> list[TrainOutput]:
        """Train on each dataset in turn, closing each task (:meth:`end_task`) before the next;
        ``after_task(trainer, t)`` runs after task ``t`` (from 0) is closed (e.g. an evaluation: a
        re-initialised adapter adds nothing, so the model is the merged one)."""
        outputs = []
        for dataset in datasets:
            self.train_dataset = dataset
            outputs.append(self.train())
            self.end_task()
            if after_task is not None:
                after_task(self, self.task_index - 1)
        return outputs
