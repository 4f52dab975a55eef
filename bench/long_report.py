"""The report of bench/quality.py's seeded runs on the long and mixed-kind sequences (SHARED10, MIXED).

    python bench/long_report.py --runs runs/long [runs/long2 ...] --results-dir bench/results --tag h100 \\
        [--notes notes.md]

Reads each directory's ``runs.jsonl`` (the last launch of a run key counts, a later directory's
replacing an earlier one's) and the ``results.json`` of every run that finished, and writes
``long_<tag>.md`` and ``long_<tag>.json``: per order and method, the mean and sample standard
deviation over seeds of AA, BWT, FWT, forgetting, the eval tasks' mean and generalisation
(docs/protocol.md); the last row of R per task, with each task's metric; the issue's targets checked
on SHARED10 (gorp AA ≥ mtl − 1, BWT ≥ −1, AA ≥ every other sequential method's + 3). Only what
finished is reported; what did not is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean, stdev
from typing import Any

COLUMNS = ("AA", "BWT", "FWT", "forgetting", "eval_mean", "generalisation")
SIGNED = frozenset({"BWT", "FWT", "generalisation"})
SEQUENTIAL = ("o-lora", "seq-lora", "galore", "seq-ft")


def collect(dirs: list[Path]) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[dict[str, Any]]]:
    """``({(order, method): [finished run, one per seed]}, [unfinished ledger records])``; a run is its
    ledger record plus ``results`` (its results.json)."""
    latest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for directory in dirs:
        for line in (directory / "runs.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("group") == "main":
                    latest[record["run"]] = (directory, record)
    finished: dict[tuple[str, str], list[dict[str, Any]]] = {}
    unfinished = []
    for _, (directory, record) in sorted(latest.items()):
        path = directory / record.get("output_dir", "") / record["method"] / "results.json"
        if record.get("status") == "done" and path.is_file():
            run = {**record, "results": json.loads(path.read_text())}
            finished.setdefault((record["order"], record["method"]), []).append(run)
        else:
            unfinished.append(record)
    return finished, unfinished


def values(run: dict[str, Any]) -> dict[str, float | None]:
    """A run's report columns: the trained tasks' metrics and the eval tasks' (None where absent)."""
    results = run["results"]
    evals = results.get("eval_tasks", {}).get("metrics", {})
    return {**{k: results["metrics"].get(k) for k in ("AA", "BWT", "FWT", "forgetting")},
            "eval_mean": evals.get("eval_mean"), "generalisation": evals.get("generalisation")}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per column: mean, sample standard deviation (None for one seed) and the number of seeds."""
    out: dict[str, dict[str, float | int | None]] = {}
    for column in COLUMNS:
        present = [v[column] for v in map(values, runs) if v[column] is not None]
        out[column] = {"mean": mean(present) if present else None,
                       "sd": stdev(present) if len(present) > 1 else None, "n": len(present)}
    return out


def _fmt(stat: dict[str, Any], signed: bool) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    if stat["sd"] is not None:
        text += f" ± {stat['sd']:.1f}"
    return text.replace("-", "−")


def last_row(runs: list[dict[str, Any]]) -> tuple[list[str], list[str], list[float]]:
    """(task names, metrics, the last row of R averaged over the seeds' runs)."""
    first = runs[0]["results"]
    rows = [r["results"]["R"][-1] for r in runs]
    return first["tasks"], first.get("task_metrics", ["accuracy"] * len(first["tasks"])), \
        [mean(row[j] for row in rows) for j in range(len(first["tasks"]))]


def _num(value: float, signed: bool = False) -> str:
    return (f"{value:+.1f}" if signed else f"{value:.1f}").replace("-", "−")


def targets(table: dict[tuple[str, str], dict[str, Any]], order: str) -> list[str]:
    """The issue's targets for gorp on ``order``, each with its numbers (seed means)."""
    gorp, mtl = table.get((order, "gorp")), table.get((order, "mtl"))
    if gorp is None or gorp["AA"]["mean"] is None:
        return [f"- {order}: gorp did not finish; no target can be checked"]
    aa, bwt = gorp["AA"]["mean"], gorp["BWT"]["mean"]
    lines = []
    if mtl is not None:
        bar = mtl["AA"]["mean"] - 1
        lines.append(f"- gorp AA ≥ mtl − 1: {_num(aa)} vs {_num(bar)}: {'met' if aa >= bar else 'not met'}")
    if bwt is not None:
        lines.append(f"- gorp BWT ≥ −1: {_num(bwt, True)}: {'met' if bwt >= -1 else 'not met'}")
    for method in SEQUENTIAL:
        other = table.get((order, method))
        if other is not None:
            gap = aa - other["AA"]["mean"]
            lines.append(f"- gorp AA ≥ {method} + 3: {_num(aa)} vs {_num(other['AA']['mean'])} "
                         f"(gap {_num(gap, True)}): {'met' if gap >= 3 else 'not met'}")
    return lines


def write_report(dirs: list[Path], results_dir: Path, tag: str, notes: str | None = None) -> str:
    finished, unfinished = collect(dirs)
    table = {key: summarise(runs) for key, runs in finished.items()}
    orders = sorted({order for order, _ in finished}, key=lambda o: (o != "SHARED10", o))
    lines = [f"# Long and mixed-kind sequences ({tag})", "",
             "bench/quality.py --orders SHARED10,MIXED --seeds …; mean ± sample standard deviation over "
             "the seeds that finished (n). Percent: accuracy, exact match or ROUGE-L F1 × 100, per task "
             "(docs/protocol.md).", ""]
    if notes:
        lines += [notes.strip(), ""]
    for order in orders:
        lines += [f"## {order}", "",
                  "| method | n | AA | BWT | FWT | forgetting | eval mean | generalisation |",
                  "|---|---|---|---|---|---|---|---|"]
        for (o, method), stats in sorted(table.items(), key=lambda kv: kv[0][1]):
            if o == order:
                lines.append(f"| {method} | {stats['AA']['n']} | "
                             + " | ".join(_fmt(stats[c], c in SIGNED) for c in COLUMNS) + " |")
        runs = [r for (o, _), rs in finished.items() if o == order for r in rs]
        names, metrics, _ = last_row(runs)
        lines += ["", "Last row of R (mean over seeds), task (metric):", "",
                  "| method | " + " | ".join(f"{n} ({m})" for n, m in zip(names, metrics)) + " |",
                  "|---|" + "---|" * len(names)]
        for (o, method), rs in sorted(finished.items(), key=lambda kv: kv[0][1]):
            if o == order:
                lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in last_row(rs)[2]) + " |")
        if order == "SHARED10":
            lines += ["", "Targets (issue):", "", *targets(table, order)]
        lines.append("")
    if unfinished:
        lines += ["## Not finished", ""] + [f"- {r['run']}: {r.get('status', 'not run')}" for r in unfinished] + [""]
    text = "\n".join(lines)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"long_{tag}.md").write_text(text)
    saved = {"summary": {f"{o}/{m}": s for (o, m), s in table.items()},
             "runs": {f"{o}/{m}": [{"seed": r.get("seed"), "R": r["results"]["R"],
                                    "eval_R": r["results"].get("eval_tasks", {}).get("R"), **values(r)} for r in rs]
                      for (o, m), rs in finished.items()},
             "unfinished": [r["run"] for r in unfinished]}
    (results_dir / f"long_{tag}.json").write_text(json.dumps(saved, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="directories bench/quality.py wrote with --out")
    parser.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", required=True, help="file names long_<tag>.md/.json (say the card, e.g. h100)")
    parser.add_argument("--notes", default=None, help="a markdown file whose text goes after the header")
    args = parser.parse_args()
    dirs = [Path(d) for d in args.runs]
    for d in dirs:
        if not (d / "runs.jsonl").is_file():
            print(f"gorp_ds: error: --runs {d}: no runs.jsonl there (not a directory bench/quality.py wrote)",
                  file=sys.stderr)
            raise SystemExit(2)
    notes = Path(args.notes).read_text() if args.notes else None
    print(write_report(dirs, Path(args.results_dir), args.tag, notes))


if __name__ == "__main__":
    main()
