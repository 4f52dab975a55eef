"""GORP in a ``transformers.Trainer`` (gorp_ds/integrations/hf_trainer.py) trains a task sequence
exactly as the runner's ``gorp`` method does (issue 25).

The runner, as a user starts it (``python launch/train.py``: one process, a one-rank ZeRO-2 engine,
fp32), trains two tasks on the tiny LLaMA; ``GorpTrainer`` then trains the same two tasks in this
process from the same settings (the runner's own ``build_run_config`` of the same flags), fed the
runner's micro-batches in the runner's order (``AnswerBatches``) with the runner's loss. The shared
spaces S (the runner's checkpoint after the last task) and the final weights (both exported with
every LoRA merged) must agree to 1e-6. Clipping is off on both sides: the runner clips full-rank
targets by the projected gradient's norm, the Trainer by the full gradient's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from tests.support.launch import clean_env

pytestmark = pytest.mark.slow

TASKS = "emb_color,emb_animal"
STEPS, GLOBAL, MICRO = 4, 8, 4


def _flags(model: Path, ds_config: Path, out: Path, full_gradients: str) -> list[str]:
    return ["--ds_config", str(ds_config), "--model", str(model), "--dtype", "fp32", "--method", "gorp",
            "--tasks", TASKS, "--max-steps-per-task", str(STEPS), "--global-batch-size", str(GLOBAL),
            "--micro-batch-size", str(MICRO), "--max-train-per-task", "32", "--eval-samples", "4",
            "--lr-lora", "1e-2", "--lr-full", "1e-2", "--update-gap", "2", "--shared-threshold", "0.9",
            "--full-gradients", full_gradients, "--output-dir", str(out)]


def _runner(tmp: Path, model: Path, full_gradients: str) -> tuple[list[str], Path]:
    config = json.loads((REPO / "ds_configs" / "zero2_fp32.json").read_text())
    config["gradient_clipping"] = 0.0
    config["tensorboard"] = {"enabled": False}
    (tmp / "ds.json").write_text(json.dumps(config))
    flags = _flags(model, tmp / "ds.json", tmp / "runner", full_gradients)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *flags], env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return flags, tmp / "runner" / "gorp"


def _trainer(tmp: Path, flags: list[str]):
    from transformers import TrainingArguments

    from gorp_ds.cl import add_arguments, build_run_config
    from gorp_ds.data.registry import load_task_sequence
    from gorp_ds.integrations.hf_trainer import AnswerBatches, GorpTrainer
    from gorp_ds.models.loading import load_model_and_tokenizer

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_run_config(parser.parse_args(flags))
    model, tokenizer = load_model_and_tokenizer(cfg.base_model)
    tasks = load_task_sequence(cfg.data)
    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=GLOBAL // MICRO, max_steps=STEPS, lr_scheduler_type="constant",
                             max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             seed=cfg.runner.seed)
    trainer = GorpTrainer(model, args, method="gorp", lora=cfg.lora, targets=cfg.targets, optimizer=cfg.optimizer,
                          seed=cfg.runner.seed, processing_class=tokenizer)
    datasets = [AnswerBatches(task, tokenizer, cfg.data, global_batch_size=GLOBAL, micro_batch_size=MICRO, steps=STEPS,
                              seed=cfg.runner.seed, task_index=t) for t, task in enumerate(tasks)]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))  # the runner's count (cl/runner.py, one rank)
    try:
        trainer.train_tasks(datasets)
    finally:
        torch.set_num_threads(threads)
    trainer.export(str(tmp / "trainer_export"))
    return trainer


def _max_diffs(tmp: Path, runner: Path, trainer) -> dict[str, float]:
    """Largest absolute difference per kind: S, the exported weights, the next task's LoRA factors."""
    from safetensors.torch import load_file

    from gorp_ds.models.lora import lora_factor_names
    from gorp_ds.zero import read_masters

    tag = (runner / "checkpoints" / "latest").read_text().strip()
    assert tag == "task03_step000000", tag  # both tasks closed
    state = torch.load(runner / "checkpoints" / tag / "gorp_state" / "rank_00000.pt", map_location="cpu", weights_only=True)
    ours = trainer.gorp.shared
    assert sorted(state["shared"]) == sorted(ours) and len(ours) == 10  # q, v LoRA A and B, gate_proj; 2 layers
    for name, basis in ours.items():
        assert basis.shape == state["shared"][name].shape, name  # the same number of directions kept
    diffs = {"S": max(float((ours[n] - state["shared"][n]).abs().max()) for n in ours)}
    exported = load_file(str(runner / "export" / "model.safetensors"))
    mine = load_file(str(tmp / "trainer_export" / "model.safetensors"))
    assert sorted(exported) == sorted(mine)
    diffs["weights"] = max(float((mine[k] - exported[k]).abs().max()) for k in mine)
    base = load_file(str(tmp / "base.safetensors"))
    changed = max(float((exported[k] - v).abs().max()) for k, v in base.items())
    masters = read_masters(str(runner / "checkpoints"), tag)
    factors = {n: p for n, p in trainer.distributor.params_by_name.items() if n in lora_factor_names(trainer.model)}
    diffs["lora_factors"] = max(float((p.detach() - masters[n].view_as(p)).abs().max()) for n, p in factors.items())
    diffs["training_changed_weights_by"] = changed
    return diffs


def test_trainer_equals_runner(tmp_path, tiny_model_dir) -> None:
    """``--full-gradients flat``: the runner's ZeRO-2 engine hands GORP the full-rank targets' whole
    gradients, as one process does. (With the default ``projected`` path the runner forms them as
    low-rank products inside the Linear's backward: measured here 3e-6 apart in S and the weights,
    that path's own rounding, tested against the single-process optimizer in test_zero_lowrank.py.)"""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(tiny_model_dir / "model.safetensors")), str(tmp_path / "base.safetensors"))
    flags, runner = _runner(tmp_path, tiny_model_dir, "flat")
    trainer = _trainer(tmp_path, flags)
    diffs = _max_diffs(tmp_path, runner, trainer)
    print(f"max |GorpTrainer - runner|: {diffs}")  # shown with -s
    # Measured: 0.0 for all three (the same functions on the same numbers, the same thread count).
    assert diffs["S"] <= 1e-6 and diffs["weights"] <= 1e-6 and diffs["lora_factors"] <= 1e-6, diffs
    assert diffs["training_changed_weights_by"] > 1e-2, diffs  # the tasks did train: the comparison means something
    assert trainer.task_index == 2 and len(trainer.merges) == 2


def test_refused_under_trainers_deepspeed(tmp_path, tiny_model_dir) -> None:
    """TrainingArguments(deepspeed=...) stops GorpTrainer with one line saying why, before anything is built."""
    import gc

    from transformers import TrainingArguments

    from gorp_ds.integrations.hf_trainer import DEEPSPEED_REFUSAL, GorpTrainer
    from gorp_ds.models.loading import ModelConfig, load_model_and_tokenizer
    from gorp_ds.zero import UnsupportedSetupError

    model, _ = load_model_and_tokenizer(ModelConfig(model=str(tiny_model_dir), dtype="fp32"))
    args = TrainingArguments(output_dir=str(tmp_path / "ds"), use_cpu=True, report_to=[],
                             deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"})
    with pytest.raises(UnsupportedSetupError) as caught:
        GorpTrainer(model, args)
    assert str(caught.value) == DEEPSPEED_REFUSAL and "\n" not in DEEPSPEED_REFUSAL
    assert not any(".lora_" in name for name, _ in model.named_parameters())  # nothing was built on the model
    del args
    gc.collect()  # TrainingArguments(deepspeed=) leaves a weak reference transformers consults
