"""Training time of methods side by side in one process, task by task, in an order that cancels drift.

    deepspeed --num_gpus 1 bench/train_time.py --out /tmp/tt -- \
        --model embedded --data-dir <cl_benchmark> --order A --method seq-lora,gorp --max-steps-per-task 100

Why not the runner's own timings: the runner trains one method's whole sequence, then the next. A
host-bound step's time drifts over a process's life by a few percent (the host's speed is not
constant; the profiles in bench/results/cl_order_a_h200.md §5 show identical operators 1.2-1.3× slower
a minute later, or faster), so whichever method is trained later is favoured or penalised by chance: on one H200 the
same code measured gorp at 1.05× seq-lora with gorp trained after seq-lora, and at 1.14× with gorp
trained before it. Here every method keeps its own live session
(model, engine, optimizer) and the tasks are interleaved:

- for each task, a warm-up session (``--warmup``, untimed) trains it first, so CUDA's first-use
  costs of the task's sequence lengths (kernel selection, allocator growth) fall on no timed method;
- the timed methods then train that task in turn, the order reversed from one task to the next
  (A B, B A, A B, …): each method goes first as often as last, and drift within a task cancels;
- between tasks each session does what the runner does to its weights and optimizer (the LoRA merge,
  the shared-space update of ``end_task``) but no evaluation, checkpoint or export, which are not
  training time.

A task's time is :meth:`MethodSession.train_task`'s own (``progress.timings["train_s/<task number>"]``, the
same number the runner reports). Written as they come: ``times.jsonl`` (one line per method and
task; ``position`` is its place in the task's order, 0 being the warm-up), then ``summary.json`` and ``summary.md`` (totals, ratios to the first method, per task).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.session_harness import bench_arguments, run_config  # noqa: E402


def interleaved(methods: list[str], task_index: int) -> list[str]:
    """The order the timed methods train task ``task_index`` in: as given on even tasks, reversed on odd."""
    return list(methods) if task_index % 2 == 0 else list(reversed(methods))


def summarise(times: dict[str, list[float]], baseline: str) -> dict:
    """Totals, per-task times and ratios to ``baseline``; ``times``: method -> seconds per task."""
    base = times[baseline]
    summary = {"baseline": baseline, "methods": {}}
    for method, seconds in times.items():
        if len(seconds) != len(base):
            raise ValueError(f"{method}: {len(seconds)} task times, {baseline} has {len(base)}")
        total, base_total = sum(seconds), sum(base)
        later, base_later = sum(seconds[1:]), sum(base[1:])
        summary["methods"][method] = {
            "train_s": seconds, "total_s": total, "ratio": total / base_total,
            "task_ratios": [s / b for s, b in zip(seconds, base)],
            "after_first_ratio": later / base_later if base_later else None}
    return summary


def markdown(summary: dict) -> str:
    baseline = summary["baseline"]
    lines = [f"| method | train s per task | total s | × {baseline} | tasks 2+ × {baseline} | per task × {baseline} |",
             "|---|---|---|---|---|---|"]
    for method, row in summary["methods"].items():
        later = row["after_first_ratio"]
        lines.append(f"| {method} | {' / '.join(f'{s:.1f}' for s in row['train_s'])} | {row['total_s']:.1f} | "
                     f"{row['ratio']:.3f} | {'–' if later is None else f'{later:.3f}'} | "
                     f"{' / '.join(f'{r:.2f}' for r in row['task_ratios'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for times.jsonl, summary.json and summary.md")
    parser.add_argument("--warmup", default="seq-lora",
                        help="method trained first on every task, untimed ('none': no warm-up session)")
    own, rest = bench_arguments(parser)
    import torch

    from gorp_ds.cl.progress import Progress, task_number
    from gorp_ds.cl.runner import prepare
    from gorp_ds.cl.session import MethodSession
    from gorp_ds.models.methods import METHODS, method_spec

    cfg, ds_config_path = run_config(rest, own.out)
    mixed = [m for m in (*cfg.runner.methods, own.warmup) if m in METHODS and method_spec(m).mixed_tasks]
    if mixed:
        raise SystemExit(f"train_time: {mixed[0]} trains one mixed task, not the sequence; leave it out of --method")
    if own.warmup not in (*METHODS, "none"):
        raise SystemExit(f"train_time: --warmup {own.warmup!r} is not a method; choose from {', '.join(METHODS)} or none")
    if len(cfg.runner.methods) < 2:
        raise SystemExit("train_time: give at least two methods to compare (--method seq-lora,gorp)")
    tasks, ds_config, _ = prepare(cfg, ds_config_path)
    os.makedirs(own.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    sessions: dict[str, tuple[MethodSession, Progress]] = {}
    if own.warmup != "none":  # untimed; no TensorBoard of its own
        quiet = {k: v for k, v in ds_config.items() if k != "tensorboard"}
        sessions["warm-up"] = (MethodSession(own.warmup, tasks, cfg, quiet, os.path.join(own.out, "run", "warm-up")),
                               Progress())
    for method in cfg.runner.methods:
        sessions[method] = (MethodSession(method, tasks, cfg, ds_config, os.path.join(own.out, "run", method)),
                            Progress())
    rank = next(iter(sessions.values()))[0].rank
    if rank == 0:
        open(os.path.join(own.out, "times.jsonl"), "w").close()  # this run's lines only
    times: dict[str, list[float]] = {m: [] for m in cfg.runner.methods}
    for t, task in enumerate(tasks):
        order = (["warm-up"] if "warm-up" in sessions else []) + interleaved(cfg.runner.methods, t)
        for name in order:
            session, progress = sessions[name]
            sync()  # the previous session's queued work is not this one's time
            session.train_task(t, task, progress, on_checkpoint=lambda p: None, total_tasks=len(tasks))
            session.close_adapters(t)
            session.end_task(t)
            progress.task, progress.step = t + 1, 0
            if name == "warm-up":
                continue
            seconds = progress.timings[f"train_s/{task_number(t)}"]
            times[name].append(seconds)
            if rank == 0:
                with open(os.path.join(own.out, "times.jsonl"), "a") as f:
                    f.write(json.dumps({"method": name, "task": task_number(t), "position": order.index(name),
                                        "train_s": seconds}) + "\n")
    for session, _ in sessions.values():
        session.close()
    summary = summarise(times, cfg.runner.methods[0])
    if rank == 0:
        with open(os.path.join(own.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        table = markdown(summary)
        with open(os.path.join(own.out, "summary.md"), "w") as f:
            f.write(table)
        print(table, flush=True)


if __name__ == "__main__":
    main()
