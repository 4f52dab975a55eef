"""The trained model out and back in: train with the export on, time the export and measure its
size on disk, load it with plain transformers (timed, in a fresh process), evaluate it with
``--eval-only`` under the same launcher and compare its R row and predictions with the run's last.

    python bench/export_roundtrip.py --out runs/export_roundtrip --data-dir data/CL_Benchmark --order A
    DS_ACCELERATOR=cpu python bench/export_roundtrip.py --out /tmp/export_smoke --smoke   # CPU smoke run

One JSON line per measurement on stdout (also appended to ``<out>/measurements.jsonl`` as they
come), then a short table. Extra training flags go after ``--``, e.g. ``-- --method gorp,seq-lora``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOAD = r'''
import sys, time, torch
start = time.perf_counter()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
print(f"{time.perf_counter() - start:.3f} {type(model).__name__} {model.dtype} {sum(p.numel() for p in model.parameters())}")
'''


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed(num_gpus: int, args: list[str], log: Path) -> float:
    beside = Path(sys.executable).parent / "deepspeed"
    command = [str(beside) if beside.is_file() else "deepspeed", "--num_gpus", str(num_gpus), "--master_port",
               str(_port()), str(REPO / "launch" / "train.py"), *args]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def _emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "measurements.jsonl", "a") as handle:
        handle.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the runs, logs and measurements")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--order", default="A")
    parser.add_argument("--method", default="gorp")
    parser.add_argument("--num-gpus", type=int, default=1, help="ranks of both launches (CPU: processes)")
    parser.add_argument("--smoke", action="store_true", help="tiny random LLaMA, two embedded tasks, 2 CPU ranks")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ds_config = str(REPO / "ds_configs" / "zero2.json")
    common = ["--ds_config", ds_config, "--method", args.method]
    if args.smoke:
        sys.path.insert(0, str(REPO))
        from tests.support.tiny_model import make_tiny_model_dir

        model = str(make_tiny_model_dir(out / "tiny_model"))
        args.num_gpus = 2
        common += ["--model", model, "--tasks", "emb_color,emb_animal", "--max-steps-per-task", "8",
                   "--eval-samples", "16", "--global-batch-size", "8", "--lr-lora", "3e-2", "--lr-full", "3e-2"]
        data = ["--tasks", "emb_color,emb_animal", "--eval-samples", "16"]
    else:
        if not args.data_dir:
            sys.exit("--data-dir is needed (or --smoke)")
        model = "embedded"
        data = ["--data-dir", args.data_dir, "--order", args.order]
        common += ["--model", model, *data]
    run_dir, eval_dir = out / "run", out / "eval_of_export"
    train_s = _deepspeed(args.num_gpus, [*common, "--export", "true", "--output-dir", str(run_dir), *extra],
                         out / "train.log")
    result = json.loads((run_dir / args.method / "results.json").read_text())
    export = result["exports"]["final"]
    export_dir = run_dir / args.method / "export"
    files = sorted(p.name for p in export_dir.iterdir() if p.is_file())
    _emit(out, {"measure": "export", "method": args.method, "seconds": export["seconds"], "bytes": export["bytes"],
                "gib": export["bytes"] / 2**30, "files": files, "train_command_s": train_s})

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(export_dir)], capture_output=True, text=True, env=env,
                            cwd=out)
    if loaded.returncode != 0:
        sys.exit(f"loading the export with transformers failed:\n{loaded.stderr[-3000:]}")
    seconds, cls, dtype, params = loaded.stdout.split()[-4:]
    _emit(out, {"measure": "load", "seconds": float(seconds), "class": cls, "dtype": dtype, "parameters": int(params)})

    eval_args = ["--ds_config", ds_config, "--eval-only", "true", "--model", str(export_dir), *data,
                 "--output-dir", str(eval_dir)]
    if args.smoke:
        eval_args += ["--dtype", result["config"]["dtype"]]
    eval_s = _deepspeed(args.num_gpus, eval_args, out / "eval.log")
    again = json.loads((eval_dir / "eval" / "results.json").read_text())
    run_row, eval_row = result["R"][-1], again["R"][0]
    same_lines = differing = 0
    for j in range(len(result["tasks"])):
        mine = (run_dir / args.method / result["predictions"][-1][j]).read_text().splitlines()
        theirs = (eval_dir / "eval" / again["predictions"][0][j]).read_text().splitlines()
        same_lines += sum(a == b for a, b in zip(mine, theirs))
        differing += sum(a != b for a, b in zip(mine, theirs)) + abs(len(mine) - len(theirs))
    _emit(out, {"measure": "roundtrip", "tasks": result["tasks"], "run_last_row": run_row, "eval_only_row": eval_row,
                "rows_equal": run_row == eval_row, "prediction_lines_equal": same_lines,
                "prediction_lines_differing": differing, "eval_command_s": eval_s})

    print("\n| what | value |\n|---|---|")
    print(f"| export time | {export['seconds']:.2f} s |")
    print(f"| export size on disk | {export['bytes'] / 2**20:,.1f} MiB ({', '.join(files)}) |")
    print(f"| load with transformers | {float(seconds):.2f} s ({cls}, {dtype}) |")
    print(f"| run's last R row | {', '.join(f'{v:.1f}' for v in run_row)} |")
    print(f"| --eval-only on the export | {', '.join(f'{v:.1f}' for v in eval_row)} |")
    print(f"| rows equal / prediction lines equal, differing | {run_row == eval_row} / {same_lines}, {differing} |")


if __name__ == "__main__":
    main()
