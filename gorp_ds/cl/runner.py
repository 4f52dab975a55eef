"""The continual-learning runner: for each method, for each task — train, evaluate every task,
close the task (S, LoRA merge), checkpoint. Reads like the algorithm; the work is in
``session.py`` (engine), ``evaluate.py`` (R rows), ``metrics.py`` and ``report.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..data.config import MAX_DRAWN_PER_TASK
from ..data.errors import DataError
from ..data.registry import load_eval_tasks, load_task_sequence
from ..data.tasks import Task
from ..log import get_logger, quiet_third_party
from ..models import method_spec
from ..safe_write import WriteError
from ..zero import UnsupportedSetupError, check_supported, load_ds_config
from ..zero.checkpoint_io import read_latest
from .agree import agree_on_errors, agreed, in_user_terms
from .config import ConfigError, RunConfig, reconcile_ds_config
from .evaluate import Evaluation
from .lr_schedule import check_schedule
from .metrics import all_metrics
from .peak_memory import PeakMemory
from .preemption import Preempted
from .preemption import current as current_preemption
from .preflight import preflight
from .process_group import init_process_group
from .progress import Progress, task_number
from .prompt_record import write_prompt_record
from .report import (
    eval_tasks_section,
    is_finished,
    on_rank0,
    predictions_file,
    r_matrix,
    write_method_results,
    write_predictions,
    write_progress,
    write_summary,
)
from .run_dir import Decision, monitor_path_problem, path_problem, run_settings, settle_output_dir
from .session import MethodSession, mixed_task
from .task_export import TaskExports
from .user_errors import USER_ERRORS
from .wandb_log import wandb_problem

log = get_logger(__name__)


def run(cfg: RunConfig, ds_config_path: str) -> list[dict[str, Any]]:
    """Run every configured method over the task sequence; returns each method's results."""
    quiet_third_party()  # before any model is loaded or engine built: their noise is what it filters
    if cfg.runner.eval_only:
        from .eval_only import run_eval_only

        return [run_eval_only(cfg)]
    tasks, ds_config, decision = prepare(cfg, ds_config_path)
    current_preemption().install()  # SIGTERM/SIGUSR1: checkpoint the current step and exit for requeue
    results = []
    for method in cfg.runner.methods:
        out_dir = os.path.join(cfg.runner.output_dir, method)
        finished = os.path.join(out_dir, "results.json")
        # Rank 0's view decides (nodes need not share a filesystem); settle_output_dir checked that
        # these results were produced with this run's settings.
        done = _from_rank0(_read_json(finished) if decision.resume and _rank() == 0 and os.path.isfile(finished)
                           else None)
        if done is not None and is_finished(done):
            log.info(f"[{method}] already finished with this run's settings ({finished}); skipping")
            results.append(done)
            continue
        results.append(run_method(method, tasks, cfg, ds_config, out_dir, decision.resume))
    table = on_rank0(_rank(), lambda: write_summary(cfg.runner.output_dir, results))
    if table is not None:
        mixed = any(m != "accuracy" for r in results for m in r.get("task_metrics") or ())
        scale = "each task's own metric, 0-100" if mixed else "accuracy %"
        log.info(f"methods compared ({scale}, higher AA and BWT closer to 0 are better):\n" + table)
    return results


def prepare(cfg: RunConfig, ds_config_path: str) -> tuple[list[Task], dict[str, Any], Decision]:
    """Everything that can be wrong with the input, checked before any training; then the output
    directory is settled (moved aside, or checked for --resume) and config.yaml written."""
    init_process_group()
    if not torch.cuda.is_available():
        # CPU ranks share the machine's cores: oversubscribed BLAS threads slow every rank down.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", _world())))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local)))
    problem: Exception | None = None
    try:  # this rank's checks (no collectives in here), then every rank learns of every problem
        raw_ds_config = load_ds_config(ds_config_path)
        check_supported(raw_ds_config, ds_config_path)  # first: it checks the sections' types
        ds_config = reconcile_ds_config(raw_ds_config, cfg, _world(), ds_config_path)
        stage = check_supported(ds_config, ds_config_path)
        if (wandb := wandb_problem(ds_config)) is not None:
            raise UnsupportedSetupError(f"{ds_config_path}: {wandb}")
        for spec in map(method_spec, cfg.runner.methods):
            if stage == 3 and spec.zero3_refusal:
                raise UnsupportedSetupError(
                    f"{ds_config_path}: 'zero_optimization.stage' is 3, but {spec.zero3_refusal}; run {spec.name} "
                    "with stage 2 (ds_configs/zero2.json) or leave it out of --method")
        if (path := path_problem(cfg.runner.output_dir)) is not None:
            raise ConfigError(path)
        if (path := monitor_path_problem(ds_config, ds_config_path)) is not None:
            raise ConfigError(path)
        try:
            tasks = load_task_sequence(cfg.data)
            unseen = load_eval_tasks(cfg.data, tasks)  # refused here, before training; sessions load them again
        except DataError as err:
            raise ConfigError(in_user_terms(str(err), cfg.written_as)) from None
        check_budgets(cfg, tasks)
        check_schedule(cfg, tasks)
        preflight(cfg)
    except USER_ERRORS as err:
        problem = err
    agree_on_errors(problem)
    decision = settle_output_dir(cfg, ds_config, _world())
    log.info(f"{len(tasks)} tasks: {' → '.join(t.name for t in tasks)}"
             + (f"; eval tasks (never trained): {', '.join(t.name for t in unseen)}" if unseen else "") + f"; methods: {', '.join(cfg.runner.methods)}; "
             f"{_world()} ranks, global batch {cfg.runner.global_batch_size}, {torch.get_num_threads()} CPU threads per rank")
    return tasks, ds_config, decision


def check_budgets(cfg: RunConfig, tasks: list[Task]) -> None:
    """Refuse budgets the loaded tasks cannot train: a global batch larger than a task's train split
    (a step would hold an example twice), and more example draws for one task than its batch order
    may hold (MAX_DRAWN_PER_TASK: the order is built whole, on every rank, before the first step)."""
    runner, flag = cfg.runner, cfg.written_as
    smallest = min(tasks, key=lambda t: len(t.train))
    if runner.global_batch_size > len(smallest.train):
        raise ConfigError(f"{flag('global_batch_size')} {runner.global_batch_size} is larger than the train split of "
                          f"task {smallest.name} ({len(smallest.train)} examples), so a step would hold an example "
                          f"twice; use at most {len(smallest.train)}")

    def drawn(task: Task) -> int:  # MethodSession.steps_for × the global batch
        steps = runner.max_steps_per_task or max(1, math.ceil(runner.epochs * len(task.train) / runner.global_batch_size))
        return steps * runner.global_batch_size

    mixed = any(method_spec(m).mixed_tasks for m in runner.methods)  # one task of all tasks' steps
    for name, count, size in ([("the tasks mixed", sum(map(drawn, tasks)), sum(len(t.train) for t in tasks))] if mixed
                              else [(f"task {t.name}", drawn(t), len(t.train)) for t in tasks]):
        if count <= MAX_DRAWN_PER_TASK:
            continue
        if runner.max_steps_per_task:
            fix = f"use at most {flag('max_steps_per_task')} {max(1, MAX_DRAWN_PER_TASK * runner.max_steps_per_task // count)}"
        else:
            fix = f"use at most {flag('epochs')} {MAX_DRAWN_PER_TASK / count * runner.epochs:.4g}"
        budget = (f"{flag('max_steps_per_task')} {runner.max_steps_per_task}" if runner.max_steps_per_task
                  else f"{flag('epochs')} {runner.epochs:g}")
        raise ConfigError(f"{budget} draws {count} examples for {name} ({size} train examples, "
                          f"{flag('global_batch_size')} {runner.global_batch_size}); a task's batch order holds at "
                          f"most {MAX_DRAWN_PER_TASK}: {fix}")


def run_method(method: str, tasks: list[Task], cfg: RunConfig, ds_config: dict[str, Any], out_dir: str,
               resume: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    peak = PeakMemory()
    peak.start()  # this method's own peak: the model and engine it builds are part of it
    spec = method_spec(method)
    schedule = [mixed_task(tasks)] if spec.mixed_tasks else tasks
    try:
        session = MethodSession(method, tasks, cfg, ds_config, out_dir)
    except WriteError as err:  # the TensorBoard event file could not be created
        raise err.noted(kept_note(os.path.join(out_dir, "checkpoints"), _rank())) from None
    progress = session.resume() if resume and _from_rank0(session.has_checkpoint()) else Progress()
    if 0 not in progress.rows:
        evaluation, progress.timings["eval_s/0"] = session.evaluate()
        record_row(session, progress, 0, evaluation)

    def save(state: Progress) -> str | None:  # a checkpoint, then a failed TensorBoard write stops every rank
        tag = session.save(state)
        session.monitor.raise_failure(kept_note(session.checkpoint_dir, session.rank))
        return tag

    exports = TaskExports(session)  # per task: the PEFT adapter and the full targets' delta
    for t in range(progress.task, len(schedule)):
        with noted_writes(session):
            exports.task_started(t, progress)
        session.train_task(t, schedule[t], progress, on_checkpoint=save, total_tasks=len(schedule))
        # The LoRA merge (fp32, from the masters) comes before the row: R[row] is measured on
        # exactly the weights an export after this task writes.
        session.close_adapters(t)
        row = len(tasks) if spec.mixed_tasks else t + 1
        evaluation, progress.timings[f"eval_s/{row}"] = session.evaluate()
        record_row(session, progress, row, evaluation)
        sizes = gather_sizes(session.end_task(t))
        session.monitor.shared_space(progress.global_step, sizes)
        progress.task, progress.step = t + 1, 0
        if cfg.runner.export_every_task:
            export(session, progress, f"task_{task_number(t):02d}")
        with noted_writes(session):
            exports.task_finished(t, schedule[t].name)
        tag = save(progress)
        if t + 1 < len(schedule) and session.preemption.should_stop():  # signalled during eval/boundary
            raise Preempted(tag)
        log_eta(method, progress, len(schedule))
    if cfg.runner.export:
        # R is complete: its results are written before the export, marked unfinished (a --resume
        # still writes the export), so that a disk that fills during the export keeps them.
        write_results(session, assemble(method, tasks, cfg, progress, time.perf_counter() - started, peak,
                                        session.eval_tasks), finished=False)
        export(session, progress, "final")
    exports.close()
    result = assemble(method, tasks, cfg, progress, time.perf_counter() - started, peak, session.eval_tasks)
    session.monitor.metrics(result["metrics"], progress.global_step)
    if "eval_tasks" in result:
        session.monitor.metrics(result["eval_tasks"]["metrics"], progress.global_step)
    write_results(session, result, finished=True)
    session.close()
    return result


def write_results(session: MethodSession, result: dict[str, Any], *, finished: bool) -> None:
    """The method's ``results.json`` (with ``finished``: whether everything it writes is written,
    so a --resume skips it), table and heatmap, from rank 0; a failed write stops every rank."""
    result["finished"] = finished
    note = kept_note(session.checkpoint_dir, session.rank)
    session.monitor.raise_failure(note)
    on_rank0(session.rank, lambda: write_method_results(session.out_dir, result, note))


@contextlib.contextmanager
def noted_writes(session: MethodSession) -> Iterator[None]:
    """A failed output write in the block says which checkpoint a ``--resume`` continues from."""
    try:
        yield
    except WriteError as err:
        raise err.noted(kept_note(session.checkpoint_dir, session.rank)) from None


def export(session: MethodSession, progress: Progress, label: str) -> None:
    """``export/`` (label "final") or ``export/<label>/``; size and time kept with the timings."""
    directory = os.path.join(session.out_dir, "export", "" if label == "final" else label).rstrip("/")
    with noted_writes(session):
        info = session.export(directory)
        agreed(lambda: info is not None and write_prompt_record(session.tasks, session.tokenizer, session.cfg,
                                                                session.method, directory))
    if info is not None:  # rank 0
        progress.timings[f"export_s/{label}"] = info.seconds
        progress.timings[f"export_bytes/{label}"] = float(info.bytes)


def record_row(session: MethodSession, progress: Progress, row: int, evaluation: Evaluation) -> None:
    # A row holds the trained tasks' columns, then the eval tasks' (--eval-tasks); assemble splits them.
    names = [t.name for t in [*session.tasks, *session.eval_tasks]]
    progress.rows[row] = evaluation.row
    trained = len(session.tasks)
    session.monitor.accuracy_row(row, names[:trained], progress.rows[row][:trained])
    session.monitor.eval_task_row(row, names[trained:], progress.rows[row][trained:])
    cells = ", ".join(f"{n} {v:.1f}" for n, v in zip(names, progress.rows[row]))
    log.info(f"[{session.method}] R[{row}] ({'before training' if row == 0 else f'after task {row}'}): {cells}")
    note = kept_note(session.checkpoint_dir, session.rank)

    def write() -> None:
        if session.cfg.runner.predictions:
            write_predictions(session.out_dir, row, names, evaluation.predictions or [], note)
        write_progress(session.out_dir, progress.to_state(), note)

    on_rank0(session.rank, write)
    session.monitor.raise_failure(note)


def kept_note(checkpoint_dir: str, rank: int) -> str:
    """What a failed output write leaves intact, for its message (rank 0's view)."""
    tag = read_latest(checkpoint_dir) if rank == 0 else None
    if tag is None:
        return "the files written before it are intact"
    return (f"the files written before it and checkpoint {os.path.join(checkpoint_dir, tag)} are intact "
            "(--resume continues from it)")


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


def assemble(method: str, tasks: list[Task], cfg: RunConfig, progress: Progress, wall_s: float,
             peak: PeakMemory, eval_tasks: list[Task] | None = None) -> dict[str, Any]:
    trained = len(tasks)
    full = r_matrix(progress.rows, trained)  # rows: the trained tasks' columns, then the eval tasks'
    r = [None if row is None else row[:trained] for row in full]
    train_s = sum(v for k, v in progress.timings.items() if k.startswith("train_s/"))
    tokens = sum(v for k, v in progress.timings.items() if k.startswith("tokens/"))
    names = [t.name for t in tasks]
    exports = {k.split("/", 1)[1]: {"path": "export" if k.endswith("/final") else f"export/{k.split('/', 1)[1]}",
                                    "seconds": v, "bytes": int(progress.timings[f"export_bytes/{k.split('/', 1)[1]}"])}
               for k, v in progress.timings.items() if k.startswith("export_s/")}
    return {
        "method": method,
        "tasks": names,
        "task_metrics": [t.metric for t in tasks],  # what each column of R measures (gorp_ds/data/metrics.py)
        "R": r,
        "metrics": all_metrics(r),
        **eval_tasks_section(full, trained, eval_tasks or [], cfg.runner.predictions),
        # predictions[i][j]: the JSONL of R[i][j], relative to this directory (None: row not measured)
        "predictions": [[predictions_file(i, j, n) for j, n in enumerate(names)] if row is not None and cfg.runner.predictions
                        else None for i, row in enumerate(r)],
        "exports": exports,
        "timings": {"wall_s": wall_s, "train_s": train_s,
                    "eval_s": sum(v for k, v in progress.timings.items() if k.startswith("eval_s/")),
                    "tokens_per_s": tokens / train_s if train_s else 0.0},
        # This method's peak since it started in this process (None: not measurable here), and what
        # was measured: "cuda_allocated" or "rss_high_water_mark" (gorp_ds/cl/peak_memory.py).
        "peak_memory_gib": peak.gib(),
        "peak_memory_source": peak.source,
        "world_size": _world(),
        "config": run_settings(cfg),
        # Settings changed on a resume: {field, old, new, task (numbered from 1), step, global_step}
        # (the new value applied from that step on).
        "config_changes": progress.changes,
        "skipped_nonfinite_steps": progress.skipped_steps,
    }


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (decisions from files that only rank 0 may see)."""
    if not dist.is_initialized() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
