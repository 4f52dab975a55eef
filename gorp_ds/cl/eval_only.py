"""``--eval-only --model <exported dir or checkpoint>``: one row of R on the task list, its
predictions and the usual report files, under ``<output-dir>/eval/``. ``--eval-tasks`` are
evaluated in the same row after the task list's columns, as in every row of a training run, and
reported the same way (``results.json``'s ``eval_tasks``, with one row; report.eval_tasks_section).

An exported (or any Hugging Face) directory is loaded as a plain causal LM. A checkpoint is
rebuilt as its method's engine (see ``restore.py``) and its current LoRA merged in fp32 from the
masters, i.e. evaluated on the weights its export would hold. Evaluation is sharded over the
launch's ranks exactly like the training run's rows, so the same model, tasks, ranks and
evaluation settings give the same row and the same predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ..data.errors import DataError
from ..data.prompting import PromptFormat
from ..data.registry import load_eval_tasks, load_task_sequence
from ..log import get_logger
from ..models import load_model_and_tokenizer
from ..safe_write import path_problem
from .agree import agree_on_errors, in_user_terms
from .config import ConfigError, RunConfig
from .evaluate import evaluate_row
from .process_group import init_process_group
from .prompt_record import PROMPT_RECORD_NAME, record_differences
from .report import eval_tasks_section, on_rank0, predictions_file, write_method_results, write_predictions
from .restore import find_checkpoint, rebuild_session
from .session import evaluation_settings

log = get_logger(__name__)
EVAL_DIR = "eval"


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def warn_if_not_the_runs_settings(cfg: RunConfig, tasks: list) -> None:
    """An export's prompt record names the settings its run evaluated with; an evaluation with
    others measures something else than the run's last row of R, which is said before it starts."""
    path = os.path.join(cfg.base_model.model, PROMPT_RECORD_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return  # not a gorp_ds export (any Hugging Face directory may be evaluated)
    differences = record_differences(record, tasks, cfg) if isinstance(record, dict) else []
    if differences:
        log.warning(f"this evaluation differs from the run that exported {cfg.base_model.model} in "
                    f"{'; '.join(differences)}: its row will not be the run's last row of R. To reproduce that "
                    "row, pass the run's settings: --config <run's output dir>/config.yaml")


def run_eval_only(cfg: RunConfig) -> dict[str, Any]:
    init_process_group()  # a launcher's group, or (a plain process) a one-rank group of its own
    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local)))
    out_dir = os.path.join(cfg.runner.output_dir, EVAL_DIR)
    problem: ConfigError | None = None
    try:  # the task list and the output path, on every rank, before any model is loaded
        tasks = load_task_sequence(cfg.data)
        unseen = load_eval_tasks(cfg.data, tasks)  # an eval task also in the task list is refused, as in a run
        if (where := path_problem(out_dir, f"--output-dir {cfg.runner.output_dir} (the evaluation writes "
                                           f"{out_dir})")) is not None:
            raise ConfigError(where)
    except DataError as err:
        problem = ConfigError(in_user_terms(str(err), cfg.written_as))
    except ConfigError as err:
        problem = err
    agree_on_errors(problem)
    started = time.perf_counter()
    found = find_checkpoint(cfg.base_model.model)
    settings = evaluation_settings(cfg)
    if found is not None:
        # eval_tasks=None: the saved run's eval tasks are not this evaluation's (evaluated below).
        session = rebuild_session(*found, tasks=tasks, world=world, out_dir=out_dir, eval_tasks=None,
                                  eval_batch_size=cfg.runner.eval_batch_size, prompt_format=cfg.data.prompt_format,
                                  max_source_length=cfg.data.max_source_length, max_target_length=cfg.data.max_target_length)
        session.merge_in_place()
        model, tokenizer, source = session.engine.module, session.tokenizer, f"checkpoint {cfg.base_model.model} ({session.method})"
    else:
        model, tokenizer = load_model_and_tokenizer(dataclasses.replace(cfg.base_model, gradient_checkpointing=False))
        model.to(_device())
        session, source = None, f"model {cfg.base_model.model}"
    PromptFormat(cfg.data.prompt_format).check(tokenizer)
    if rank == 0 and found is None:
        warn_if_not_the_runs_settings(cfg, tasks)
    log.info(f"evaluating {source} on {len(tasks)} tasks: {', '.join(t.name for t in tasks)}"
             + (f"; eval tasks: {', '.join(t.name for t in unseen)}" if unseen else "") + f" ({world} ranks)")
    # One row as a run's: the task list's columns, then the eval tasks' (runner.record_row, session.evaluate).
    evaluation = evaluate_row(model, tokenizer, [*tasks, *unseen], **settings, rank=rank, world=world)
    names, columns = [t.name for t in tasks], [t.name for t in [*tasks, *unseen]]
    log.info("[eval] " + ", ".join(f"{n} {v:.1f}" for n, v in zip(columns, evaluation.row)))
    row = evaluation.row[:len(tasks)]
    result = {
        "method": "eval",
        "eval_only": True,
        "model": cfg.base_model.model,
        "tasks": names,
        "task_metrics": [t.metric for t in tasks],
        "R": [row],
        "metrics": {"AA": sum(row) / len(row), "BWT": None, "FWT": None, "forgetting": None},
        **eval_tasks_section([evaluation.row], len(tasks), unseen, cfg.runner.predictions, row_names=["eval"]),
        "predictions": [[predictions_file("eval", j, n) for j, n in enumerate(names)]] if cfg.runner.predictions else None,
        "timings": {"wall_s": time.perf_counter() - started, "train_s": 0.0, "eval_s": time.perf_counter() - started,
                    "tokens_per_s": 0.0},
        "world_size": world,
        "config": cfg.flat(),
    }

    def write() -> None:
        if cfg.runner.predictions:
            write_predictions(out_dir, "eval", columns, evaluation.predictions or [])
        write_method_results(out_dir, result)
        log.info(f"wrote {os.path.join(out_dir, 'results.json')}")

    on_rank0(rank, write)
    if session is not None:
        session.close()
    dist.barrier()
    return result
