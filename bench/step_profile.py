"""Where a training step's time goes, per method, on real tasks: warm task time and a torch
profile of one task, side by side in one process.

    deepspeed --num_gpus 1 bench/step_profile.py --out /tmp/prof -- \
        --data-dir <cl_benchmark> --order A --method seq-lora,gorp --max-steps-per-task 30

For each method: task 1 trains unprofiled (warm-up: CUDA's first-use costs of every sequence
length), task 2 trains unprofiled and timed (``warm_s``), task 3 trains under ``torch.profiler``.
Printed per method: warm seconds, kernel launches and operators per step, and the operators with
the largest self device time and self host time. One JSON line per method goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.session_harness import bench_arguments, run_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for profile.jsonl and the tables")
    parser.add_argument("--top", type=int, default=25, help="operators listed per table")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps of task 3 run under the profiler")
    own, rest = bench_arguments(parser)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gorp_ds.cl.progress import Progress
    from gorp_ds.cl.runner import prepare
    from gorp_ds.cl.session import MethodSession

    cfg, ds_config_path = run_config(rest, own.out)
    tasks, ds_config, _ = prepare(cfg, ds_config_path)
    if len(tasks) < 3:
        raise SystemExit("step_profile: needs a sequence of at least 3 tasks (warm-up, timed, profiled)")
    os.makedirs(own.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for method in cfg.runner.methods:
        session = MethodSession(method, tasks, cfg, ds_config, os.path.join(own.out, "run", method))
        progress = Progress()
        steps = session.steps_for(tasks[0])
        session.train_task(0, tasks[0], progress, on_checkpoint=lambda p: None, total_tasks=len(tasks))
        sync()
        progress.step = 0
        start = time.perf_counter()
        session.train_task(1, tasks[1], progress, on_checkpoint=lambda p: None, total_tasks=len(tasks))
        sync()
        warm_s = time.perf_counter() - start
        progress.step = max(0, steps - own.profile_steps)
        profiled = steps - progress.step
        _label_phases(session)
        with profile(activities=activities) as prof:
            session.train_task(2, tasks[2], progress, on_checkpoint=lambda p: None, total_tasks=len(tasks))
            sync()
        events = prof.key_averages()
        steps = profiled  # per-step figures below are over the profiled steps
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        aten_ops = sum(e.count for e in events if e.key.startswith("aten::"))
        device_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        record = {"method": method, "steps": steps, "warm_s": round(warm_s, 3), "profiled_steps": profiled,
                  "kernel_launches_per_step": launches / steps, "aten_ops_per_step": aten_ops / steps,
                  "device_ms_per_step": sum(getattr(e, device_attr) for e in events) / 1000 / steps if cuda else None,
                  "top_device": [(e.key, round(getattr(e, device_attr) / 1000 / steps, 3), e.count // steps)
                                 for e in sorted(events, key=lambda e: -getattr(e, device_attr))[: own.top]],
                  "top_host": [(e.key, round(e.self_cpu_time_total / 1000 / steps, 3), e.count // steps)
                               for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: own.top]],
                  "phases_host_ms": {e.key: round(e.cpu_time_total / 1000 / steps, 3) for e in events
                                     if e.key.startswith("phase:")},
                  "top_count": [(e.key, e.count // steps) for e in sorted(events, key=lambda e: -e.count)[: own.top]]}
        if session.rank == 0:
            with open(os.path.join(own.out, "profile.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if not k.startswith("top")}), flush=True)
            for title in ("top_device", "top_host", "top_count"):
                print(f"--- {method} {title} (ms per step, calls per step)")
                for row in record[title]:
                    print("   ", *row)
            with open(os.path.join(own.out, f"{method}_counts.json"), "w") as f:  # every operator: calls per step
                json.dump({e.key: [e.count / steps, e.self_cpu_time_total / 1000 / steps,
                                   getattr(e, device_attr) / 1000 / steps] for e in events}, f, indent=0)
        session.close()
        del session
        if cuda:
            torch.cuda.empty_cache()


def _label_phases(session) -> None:
    """Name the step's phases in the profile (host time of each, children included)."""
    from torch.profiler import record_function

    def labelled(name, fn):
        def call(*args, **kwargs):
            with record_function(f"phase:{name}"):
                return fn(*args, **kwargs)
        return call

    session.engine.backward = labelled("backward", session.engine.backward)
    session.engine.step = labelled("step", session.engine.step)
    session._loss = labelled("forward", session._loss)
    session._micro_batches = labelled("data", session._micro_batches)


if __name__ == "__main__":
    main()
