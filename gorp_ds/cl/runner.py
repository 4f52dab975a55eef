"""The continual-learning runner: for each method, for each task — train, evaluate every task,
close the task (S, LoRA merge), checkpoint. Reads like the algorithm; the work is in
``session.py`` (engine), ``evaluate.py`` (R rows), ``metrics.py`` and ``report.py``.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from ..data.config import DataConfig
from ..data.errors import DataError
from ..data.registry import load_task_sequence
from ..data.tasks import Task
from ..log import get_logger
from ..zero import check_supported, load_ds_config
from .config import ConfigError, RunConfig, reconcile_ds_config
from .metrics import all_metrics
from .preemption import Preempted
from .preemption import current as current_preemption
from .preflight import preflight
from .report import r_matrix, write_method_results, write_summary
from .session import MethodSession, Progress, mixed_task

log = get_logger(__name__)


def run(cfg: RunConfig, ds_config_path: str) -> list[dict[str, Any]]:
    """Run every configured method over the task sequence; returns each method's results."""
    tasks, ds_config = prepare(cfg, ds_config_path)
    current_preemption().install()  # SIGTERM/SIGUSR1: checkpoint the current step and exit for requeue
    results = []
    for method in cfg.methods:
        out_dir = os.path.join(cfg.output_dir, method)
        finished = os.path.join(out_dir, "results.json")
        if cfg.resume and os.path.isfile(finished):
            log.info(f"[{method}] already finished ({finished}); skipping")
            with open(finished) as handle:
                results.append(json.load(handle))
            continue
        results.append(run_method(method, tasks, cfg, ds_config, out_dir))
    if _rank() == 0:
        table = write_summary(cfg.output_dir, results)
        log.info("methods compared (accuracy %, higher AA and BWT closer to 0 are better):\n" + table)
    return results


def prepare(cfg: RunConfig, ds_config_path: str) -> tuple[list[Task], dict[str, Any]]:
    """Everything that can be wrong with the input, checked before any training."""
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed()
    if not torch.cuda.is_available():
        # CPU ranks share the machine's cores: oversubscribed BLAS threads slow every rank down.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", _world())))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local)))
    ds_config = reconcile_ds_config(load_ds_config(ds_config_path), cfg, _world(), ds_config_path)
    check_supported(ds_config, ds_config_path)
    try:
        tasks = load_task_sequence(DataConfig(cfg.data_dir, cfg.tasks, cfg.order, cfg.max_train_per_task,
                                              cfg.eval_samples, cfg.max_length, cfg.seed))
    except DataError as err:
        raise ConfigError(str(err)) from None
    preflight(cfg)
    log.info(f"{len(tasks)} tasks: {' → '.join(t.name for t in tasks)}; methods: {', '.join(cfg.methods)}; "
             f"{_world()} ranks, global batch {cfg.global_batch_size}, {torch.get_num_threads()} CPU threads per rank")
    return tasks, ds_config


def run_method(method: str, tasks: list[Task], cfg: RunConfig, ds_config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    schedule = [mixed_task(tasks)] if method == "mtl" else tasks
    session = MethodSession(method, tasks, cfg, ds_config, out_dir)
    progress = session.resume() if cfg.resume and session.has_checkpoint() else Progress()
    if 0 not in progress.rows:
        progress.rows[0], progress.timings["eval_s/0"] = session.evaluate()
        record_row(session, progress, 0)
    for t in range(progress.task, len(schedule)):
        session.train_task(t, schedule[t], progress, on_checkpoint=session.save, total_tasks=len(schedule))
        row = len(tasks) if method == "mtl" else t + 1
        progress.rows[row], progress.timings[f"eval_s/{row}"] = session.evaluate()
        record_row(session, progress, row)
        sizes = gather_sizes(session.end_task(t))
        session.monitor.shared_space(progress.global_step, sizes)
        progress.task, progress.step = t + 1, 0
        tag = session.save(progress)
        if t + 1 < len(schedule) and session.preemption.should_stop():  # signalled during eval/boundary
            raise Preempted(tag)
        log_eta(method, progress, len(schedule))
    result = assemble(method, tasks, cfg, progress, time.perf_counter() - started)
    session.monitor.metrics(result["metrics"], progress.global_step)
    if session.rank == 0:
        write_method_results(out_dir, result)
    session.close()
    return result


def record_row(session: MethodSession, progress: Progress, row: int) -> None:
    names = [t.name for t in session.tasks]
    session.monitor.accuracy_row(row, names, progress.rows[row])
    cells = ", ".join(f"{n} {v:.1f}" for n, v in zip(names, progress.rows[row]))
    log.info(f"[{session.method}] R[{row}] ({'before training' if row == 0 else f'after task {row}'}): {cells}")
    if session.rank == 0:
        os.makedirs(session.out_dir, exist_ok=True)
        with open(os.path.join(session.out_dir, "progress.json"), "w") as handle:
            json.dump(progress.to_state(), handle, indent=2)


def gather_sizes(local: dict[str, int]) -> dict[str, int]:
    """Columns of S per module from every rank (each holds its own tensors under ZeRO)."""
    if not dist.is_initialized() or _world() == 1:
        return local
    gathered: list[dict[str, int]] = [{} for _ in range(_world())]
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def log_eta(method: str, progress: Progress, total_tasks: int) -> None:
    trained = [v for k, v in progress.timings.items() if k.startswith("train_s/")]
    if progress.task < total_tasks and trained:
        remaining = (total_tasks - progress.task) * sum(trained) / len(trained)
        log.info(f"[{method}] {progress.task}/{total_tasks} tasks done; about {remaining / 60:.1f} min of training left")


def assemble(method: str, tasks: list[Task], cfg: RunConfig, progress: Progress, wall_s: float) -> dict[str, Any]:
    r = r_matrix(progress.rows, len(tasks))
    train_s = sum(v for k, v in progress.timings.items() if k.startswith("train_s/"))
    tokens = sum(v for k, v in progress.timings.items() if k.startswith("tokens/"))
    return {
        "method": method,
        "tasks": [t.name for t in tasks],
        "R": r,
        "metrics": all_metrics(r),
        "timings": {"wall_s": wall_s, "train_s": train_s,
                    "eval_s": sum(v for k, v in progress.timings.items() if k.startswith("eval_s/")),
                    "tokens_per_s": tokens / train_s if train_s else 0.0},
        "peak_memory_gib": peak_memory_gib(),
        "world_size": _world(),
        "config": {k: v for k, v in vars(cfg).items()},
    }


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
