"""The README's table of the embedded default (`make run`), made from recorded runs.

    # after a run: record it (its results.json files, where and when it ran, its wall time)
    python scripts/readme_numbers.py record runs/gorp_ds --where "2 CPU processes, 2 cores" \
        --wall-s 412 --wall-note "make run from a fresh clone, install included" \
        --out bench/results/embedded_default_cpu.json
    # write the table into README.md from every bench/results/embedded_default_*.json
    python scripts/readme_numbers.py render
    python scripts/readme_numbers.py render --check      # status 1 if README.md disagrees

A record keeps each method's R, so that its metrics can be recomputed from R
(tests/unit/test_readme_numbers.py does), and says on what machine and when the run was made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

README = REPO / "README.md"
RECORDS = REPO / "bench" / "results"
PATTERN = "embedded_default_*.json"
# What a record's peak memory measured (gorp_ds/cl/peak_memory.py), in the table's words.
PEAK_SOURCES = {"cuda_allocated": "the CUDA allocator's peak", "rss_high_water_mark": "the resident set's peak (RSS)"}
BEGIN = "<!-- embedded-default-table: written by scripts/readme_numbers.py render; do not edit by hand -->"
END = "<!-- end of embedded-default-table -->"


def machine() -> dict[str, Any]:
    """What the run ran on: the accelerator if any, else the CPU; the software versions."""
    import deepspeed
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__}


def record(run_dir: Path, where: str, wall_s: float, wall_note: str) -> dict[str, Any]:
    """The record of one finished run directory (every ``<method>/results.json`` in it)."""
    methods, order = [], []
    for path in sorted(run_dir.glob("*/results.json")):
        result = json.loads(path.read_text())
        order = result.get("config", {}).get("methods", order)  # the run's method order (the same in each)
        methods.append({"method": result["method"], "tasks": result["tasks"], "R": result["R"],
                        "metrics": result["metrics"], "train_s": result["timings"]["train_s"],
                        "peak_memory_gib": result.get("peak_memory_gib"),
                        "peak_memory_source": result.get("peak_memory_source")})
    if not methods:
        raise SystemExit(f"readme_numbers: error: {run_dir}: no <method>/results.json (did the run finish?)")
    position = {m: i for i, m in enumerate(order)}
    methods.sort(key=lambda m: position.get(m["method"], len(position)))
    return {"where": where, "date": datetime.date.today().isoformat(), "machine": machine(),
            "wall_s": wall_s, "wall_note": wall_note, "run_dir": str(run_dir), "methods": methods}


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text.replace("-", "−")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _machine_text(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    device = m["gpu"] or f"{m['cores']} cores of {m['cpu']}"
    return f"{device}; torch {m['torch']}, deepspeed {m['deepspeed']}"


def table(records: list[dict[str, Any]]) -> str:
    """The markdown block between the README's markers."""
    lines = ["| where | method | AA | BWT | FWT | forgetting | train s | peak memory GiB | wall time of the command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for i, m in enumerate(rec["methods"]):
            x = m["metrics"]
            peak = "not measured" if m["peak_memory_gib"] is None else f"{m['peak_memory_gib']:.2f}"
            wall = f"{_duration(rec['wall_s'])} ({rec['wall_note']})" if i == 0 else "(same run)"
            lines.append(f"| {rec['where']} | {m['method']} | {_number(x['AA'])} | {_number(x['BWT'], True)} | "
                         f"{_number(x['FWT'], True)} | {_number(x['forgetting'])} | {m['train_s']:.0f} | {peak} | "
                         f"{wall} |")
    lines.append("")
    for rec in records:
        sources = sorted({PEAK_SOURCES.get(m["peak_memory_source"], m["peak_memory_source"])
                          for m in rec["methods"] if m["peak_memory_source"]})
        lines.append(f"- {rec['where']}: run on {rec['date']}, {_machine_text(rec)}; peak memory is "
                     f"{' / '.join(sources) or 'not measured'}, each method's own from its start; record "
                     f"`bench/results/{rec['file']}`.")
    return "\n".join(lines)


def load_records(directory: Path = RECORDS) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.glob(PATTERN)):
        rec = json.loads(path.read_text())
        rec["file"] = path.name
        records.append(rec)
    return records


def readme_block(text: str) -> str:
    """What the README holds between the markers."""
    try:
        start = text.index(BEGIN) + len(BEGIN)
        return text[start:text.index(END, start)].strip("\n")
    except ValueError:
        raise SystemExit(f"readme_numbers: error: {README} has no embedded-default table markers") from None


def render(check: bool) -> int:
    text = README.read_text()
    wanted = table(load_records())
    if readme_block(text) == wanted:
        return 0
    if check:
        print(f"readme_numbers: {README.name}'s embedded-default table differs from bench/results/{PATTERN}; "
              "run: python scripts/readme_numbers.py render", file=sys.stderr)
        return 1
    start = text.index(BEGIN) + len(BEGIN)
    README.write_text(text[:start] + "\n" + wanted + "\n" + text[text.index(END, start):])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record a finished run directory")
    rec.add_argument("run_dir", type=Path)
    rec.add_argument("--where", required=True, help="the table's first column, e.g. '2 CPU processes, 2 cores'")
    rec.add_argument("--wall-s", type=float, required=True, help="wall time of the command, measured outside it")
    rec.add_argument("--wall-note", required=True, help="what the wall time covers")
    rec.add_argument("--out", type=Path, required=True, help=f"bench/results/{PATTERN}")
    ren = sub.add_parser("render", help="write the table into README.md")
    ren.add_argument("--check", action="store_true", help="only compare; status 1 where they differ")
    args = parser.parse_args(argv)
    if args.command == "record":
        args.out.write_text(json.dumps(record(args.run_dir, args.where, args.wall_s, args.wall_note), indent=1) + "\n")
        print(f"recorded {args.run_dir} in {args.out}")
        return 0
    return render(args.check)


if __name__ == "__main__":
    sys.exit(main())
