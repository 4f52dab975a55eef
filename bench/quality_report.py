"""The report of bench/quality.py: tables, the issue's targets checked, heatmaps (``--report``).

Reads ``plan.json``, ``runs.jsonl`` and each run's ``results.json`` under the given directories (a
later directory's run of the same key replaces an earlier one) and reports only what finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

METRICS = ("AA", "BWT", "FWT", "forgetting")


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text.replace("-", "−")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def collect(dirs: list[Path]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``({run key: entry}, [unfinished records], plan)``; an entry holds the run's spec, its
    ``results.json`` and its ledger record (status, wall time, concurrency)."""
    finished: dict[str, dict[str, Any]] = {}
    unfinished: dict[str, dict[str, Any]] = {}
    plan: dict[str, Any] = {}
    for directory in dirs:
        plan = json.loads((directory / "plan.json").read_text()) if (directory / "plan.json").is_file() else plan
        ledger: dict[str, dict[str, Any]] = {}
        for line in (directory / "runs.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                ledger[record["run"]] = record  # the last launch of a key counts
        specs = {f"{r['group']}/{r['order']}/{r['label']}": r for r in plan.get("runs", [])} if plan else {}
        for key in {**specs, **ledger}:
            spec = ledger.get(key, specs.get(key))
            safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in spec["label"])
            results = directory / spec["group"] / spec["order"] / safe / spec["method"] / "results.json"
            if results.is_file():
                entry = {**spec, "record": ledger.get(key, {}), "results": json.loads(results.read_text()),
                         "directory": str(directory)}
                finished[key] = entry
                unfinished.pop(key, None)
            elif key not in finished:
                unfinished[key] = {**spec, "status": ledger.get(key, {}).get("status", "not run")}
    return finished, list(unfinished.values()), plan


def _by(entries: dict[str, dict[str, Any]], group: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["order"], e["label"]): e for e in entries.values() if e["group"] == group}


def method_table(main: dict[tuple[str, str], dict[str, Any]], methods: list[str], orders: list[str]) -> list[str]:
    lines = ["| method | orders | AA | BWT | FWT | forgetting | train s (concurrent) | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        runs = [main[(o, method)] for o in orders if (o, method) in main]
        if not runs:
            continue
        values = {k: _mean([r["results"]["metrics"].get(k) for r in runs]) for k in METRICS}
        train = mean(r["results"]["timings"]["train_s"] for r in runs)
        memory = max(r["results"]["peak_memory_gib"] for r in runs)
        lines.append(f"| {method} | {','.join(r['order'] for r in runs)} | {_fmt(values['AA'])} | "
                     f"{_fmt(values['BWT'], True)} | {_fmt(values['FWT'], True)} | {_fmt(values['forgetting'])} | "
                     f"{train:.0f} | {memory:.2f} |")
    return lines


def order_table(main: dict[tuple[str, str], dict[str, Any]], methods: list[str], orders: list[str]) -> list[str]:
    lines = ["| order | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for order in orders:
        cells = []
        for method in methods:
            entry = main.get((order, method))
            if entry is None:
                cells.append("")
                continue
            m = entry["results"]["metrics"]
            cells.append(_fmt(m["AA"]) + ("" if m.get("BWT") is None else f" / {_fmt(m['BWT'], True)}"))
        lines.append(f"| {order} | " + " | ".join(cells) + " |")
    return lines


def targets(main: dict[tuple[str, str], dict[str, Any]], orders: list[str]) -> list[str]:
    """The issue's targets, each with its numbers, on the orders where every method involved finished."""

    def metric(order: str, method: str, key: str) -> float | None:
        entry = main.get((order, method))
        return None if entry is None else entry["results"]["metrics"].get(key)

    lines = []
    both = [o for o in orders if metric(o, "gorp", "AA") is not None and metric(o, "o-lora", "AA") is not None]
    if both:
        gap = mean(metric(o, "gorp", "AA") - metric(o, "o-lora", "AA") for o in both)
        lines.append(f"- gorp AA ≥ o-lora AA + 3 (mean over {','.join(both)}): {_fmt(gap, True)} points → "
                     f"{'met' if gap >= 3 else 'not met'}")
    gorp_bwt = {o: metric(o, "gorp", "BWT") for o in orders if metric(o, "gorp", "BWT") is not None}
    if gorp_bwt:
        worst = min(gorp_bwt.values())
        lines.append("- gorp BWT ≥ −1 on every order: " + ", ".join(f"{o} {_fmt(v, True)}" for o, v in gorp_bwt.items())
                     + f" → {'met' if worst >= -1 else 'not met'}")
    with_mtl = [o for o in orders if metric(o, "gorp", "AA") is not None and metric(o, "mtl", "AA") is not None]
    if with_mtl:
        gap = mean(metric(o, "gorp", "AA") - metric(o, "mtl", "AA") for o in with_mtl)
        lines.append(f"- gorp AA within 1 point of mtl (mean over {','.join(with_mtl)}): {_fmt(gap, True)} → "
                     f"{'met' if gap >= -1 else 'not met'}")
    pairs = {o: (metric(o, "o-lora", "BWT"), metric(o, "seq-lora", "BWT")) for o in orders}
    pairs = {o: p for o, p in pairs.items() if None not in p}
    if pairs:
        ok = all(a >= b for a, b in pairs.values())
        lines.append("- o-lora BWT ≥ seq-lora BWT on every order: "
                     + ", ".join(f"{o} {_fmt(a, True)} vs {_fmt(b, True)}" for o, (a, b) in pairs.items())
                     + f" → {'met' if ok else 'not met'}")
    return lines or ["- (no order has the runs a target needs)"]


def sweep_table(sweep: dict[tuple[str, str], dict[str, Any]], main: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Each sweep entry against its reference: the sweep's own ``<method>_default`` on that order,
    otherwise the method comparison's run of the method on that order."""
    lines = ["| order | method | setting | AA | BWT | FWT | forgetting | ΔAA | ΔBWT | reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (order, _), entry in sorted(sweep.items(), key=lambda kv: (kv[0][0], kv[1]["method"], kv[0][1])):
        method = entry["method"]
        reference = sweep.get((order, f"{method}_default")) or main.get((order, method))
        m = entry["results"]["metrics"]
        ref = reference["results"]["metrics"] if reference else {}
        where = "" if reference is None else ("sweep default" if reference["group"] == "sweep" else "comparison run")
        deltas = {}
        for key in ("AA", "BWT"):
            if reference is entry:
                deltas[key] = "0"
            elif m.get(key) is None or ref.get(key) is None:
                deltas[key] = "–"
            else:
                deltas[key] = _fmt(m[key] - ref[key], True)
        changed = ", ".join(f"{k}={v}" for k, v in entry["settings"].items()) or "(defaults)"
        lines.append(f"| {order} | {method} | {changed} | {_fmt(m['AA'])} | {_fmt(m['BWT'], True)} | "
                     f"{_fmt(m['FWT'], True)} | {_fmt(m['forgetting'])} | {deltas['AA']} | {deltas['BWT']} | {where} |")
    return lines


def sampling_error(main: dict[tuple[str, str], dict[str, Any]], budgets: dict[str, Any]) -> list[str]:
    """Binomial standard error of one run's AA per order, from its final accuracies p_j and the n
    test examples per task: sqrt(Σ_j p_j (1 − p_j) / n) / T, averaged over the order's runs."""
    lines = []
    for order in sorted({o for o, _ in main}):
        if order not in budgets:
            continue
        n = budgets[order][1]
        errors = []
        for (o, _), entry in main.items():
            if o != order:
                continue
            final = [v / 100 for v in entry["results"]["R"][-1]]
            errors.append(100 * (sum(p * (1 - p) / n for p in final) ** 0.5) / len(final))
        if errors:
            lines.append(f"order {order} ({n} test examples per task): ±{mean(errors):.1f}")
    if not lines:
        return []
    return ["Sampling error of one run's AA (binomial standard error; a BWT has about √2 times it): "
            + "; ".join(lines) + "."]


def best_settings(sweep: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Per (order, method): the sweep entry with the highest AA and the one with the highest BWT."""
    lines = []
    for order, method in sorted({(o, e["method"]) for (o, _), e in sweep.items()}):
        entries = [e for (o, _), e in sweep.items() if o == order and e["method"] == method]
        for key in ("AA", "BWT"):
            scored = [e for e in entries if e["results"]["metrics"].get(key) is not None]
            if len(scored) > 1:
                best = max(scored, key=lambda e: e["results"]["metrics"][key])
                changed = ", ".join(f"{k}={v}" for k, v in best["settings"].items()) or "the defaults"
                lines.append(f"- order {order}, {method}: highest {key} {_fmt(best['results']['metrics'][key])} "
                             f"with {changed} (of {len(scored)} settings)")
    return lines


def write_report(dirs: list[Path], results_dir: Path, tag: str) -> str:
    from gorp_ds.cl.report import heatmap, markdown_table

    finished, unfinished, plan = collect(dirs)
    main, sweep = _by(finished, "main"), _by(finished, "sweep")
    orders = sorted({o for o, _ in main} | {o for o, _ in sweep})
    known = ["gorp", "o-lora", "seq-lora", "galore", "seq-ft", "mtl"]
    methods = [m for m in known if any(label == m for _, label in main)]
    concurrent = max((e["record"].get("max_concurrent", 0) for e in finished.values()), default=0)
    budgets = plan.get("budgets", {})
    results_dir.mkdir(parents=True, exist_ok=True)
    budget_text = "; ".join(f"order {o}: {budgets[o][0]} steps per task, {budgets[o][1]} test examples per task"
                            for o in orders if o in budgets)
    out = [f"# Quality on real data ({tag})", "",
           f"bench/quality.py; {budget_text}; {plan.get('global_batch', 16)} examples per step, the same budget for "
           "every method (mtl: the sum of the tasks' steps on the mixed data). Accuracy in percent.",
           f"Train time: up to {concurrent} runs shared the one device at once, so train seconds measure that "
           "concurrency and are not comparable to isolated runs; quality and peak memory (per process) are not "
           "affected." + (" **Smoke run (tiny random model): the numbers mean nothing.**" if plan.get("smoke") else ""),
           ""]
    if main:
        out += ["## Methods, averaged over orders", ""] + method_table(main, methods, orders) + [""]
        out += ["## AA / BWT per order", ""] + order_table(main, methods, orders) + [""]
        out += sampling_error(main, budgets) + [""]
        out += ["## Targets", ""] + targets(main, orders) + [""]
    if sweep:
        out += ["## Sweep: one setting at a time (sensitivity)", ""] + sweep_table(sweep, main) + [""]
        out += best_settings(sweep) + [""]
    if unfinished:
        out += ["## Not finished", ""] + [f"- {u['group']}/{u['order']}/{u['label']}: {u['status']}"
                                            for u in sorted(unfinished, key=lambda u: (u["group"], u["order"]))] + [""]
    if main:
        out += ["## R per method and order", "",
                "Rows: before training, then after each task; columns: the tasks in training order.", ""]
        for order in orders:
            for method in methods:
                entry = main.get((order, method))
                if entry is None:
                    continue
                result = entry["results"]
                table = markdown_table(method, result["tasks"], result["R"], result["metrics"])
                out.append(table.replace(f"## {method}", f"### order {order}: {method}", 1))
                image = results_dir / f"quality_{tag}_{order}_{method}_R.png"
                heatmap(str(image), f"{method}, order {order}", result["tasks"], result["R"])
                out += [f"![R of {method} on order {order}]({image.name})", ""]
    text = "\n".join(out).rstrip() + "\n"
    (results_dir / f"quality_{tag}.md").write_text(text)
    summary = {key: {"group": e["group"], "order": e["order"], "method": e["method"], "label": e["label"],
                     "settings": e["settings"], "metrics": e["results"]["metrics"], "R": e["results"]["R"],
                     "tasks": e["results"]["tasks"], "train_s": e["results"]["timings"]["train_s"],
                     "peak_memory_gib": e["results"]["peak_memory_gib"],
                     "max_concurrent": e["record"].get("max_concurrent"), "wall_s": e["record"].get("wall_s")}
               for key, e in sorted(finished.items())}
    (results_dir / f"quality_{tag}.json").write_text(json.dumps({"plan": plan, "runs": summary,
                                                                 "unfinished": unfinished}, indent=2))
    return text
