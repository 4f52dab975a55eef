"""The report of bench/quality.py: tables, the issue's targets checked, heatmaps (``--report``).

Reads ``plan.json``, ``runs.jsonl`` and each run's ``results.json`` under the given directories (a
later directory's run of the same key replaces an earlier one; the report says so where the two
differ) and reports only what finished. A sweep entry is compared with the run of its order and
method whose configuration differs from its own only in the entry's settings (the sweep's default or
the method comparison's run); where none does, the closest one, with the other differences named.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

METRICS = ("AA", "BWT", "FWT", "forgetting")
# Run settings that say where a run's files go, not what it learns: left out of configuration comparisons.
NOT_LEARNING = frozenset({"output_dir", "data_dir", "checkpoints", "keep_checkpoints", "save_every", "export",
                          "export_every_task", "export_adapters", "predictions", "profile", "eval_batch_size",
                          "eval_decoder"})


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text.replace("-", "−")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def config_changes(entry: dict[str, Any], other: dict[str, Any], skip: set[str] = frozenset()) -> dict[str, tuple]:
    """``{setting: (entry's value, other's value)}`` where the two runs' configurations differ, leaving
    out where files go and ``skip``; empty when either run's results.json has no configuration."""
    mine, theirs = entry["results"].get("config"), other["results"].get("config")
    if not mine or not theirs:
        return {}
    return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs))
            if k not in NOT_LEARNING and k not in skip and mine.get(k) != theirs.get(k)}


def collect(dirs: list[Path]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``({run key: entry}, [unfinished records], plan)``; an entry holds the run's spec, its
    ``results.json`` and its ledger record (status, wall time, concurrency). An entry that replaced
    an earlier directory's run of the same key whose R or configuration differed lists it under
    ``"replaced"``."""
    finished: dict[str, dict[str, Any]] = {}
    unfinished: dict[str, dict[str, Any]] = {}
    plan: dict[str, Any] = {}
    for directory in dirs:
        own = json.loads((directory / "plan.json").read_text()) if (directory / "plan.json").is_file() else {}
        # budgets and batch from the latest plan; the planned runs of every directory
        plan = {**plan, **own, "runs": plan.get("runs", []) + own.get("runs", [])} if own else plan
        ledger: dict[str, dict[str, Any]] = {}
        for line in (directory / "runs.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                ledger[record["run"]] = record  # the last launch of a key counts
        specs = {f"{r['group']}/{r['order']}/{r['label']}": r for r in own.get("runs", [])}
        for key in {**specs, **ledger}:
            spec = ledger.get(key, specs.get(key))
            safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in spec["label"])
            results = directory / spec["group"] / spec["order"] / safe / spec["method"] / "results.json"
            if results.is_file():
                entry = {**spec, "record": ledger.get(key, {}), "results": json.loads(results.read_text()),
                         "directory": str(directory), "replaced": []}
                earlier = finished.get(key)
                if earlier is not None:
                    entry["replaced"] = earlier["replaced"]
                    if earlier["results"]["R"] != entry["results"]["R"] or config_changes(entry, earlier):
                        entry["replaced"] = entry["replaced"] + [earlier["directory"]]
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
        peaks = [r["results"]["peak_memory_gib"] for r in runs if r["results"].get("peak_memory_gib") is not None]
        lines.append(f"| {method} | {','.join(r['order'] for r in runs)} | {_fmt(values['AA'])} | "
                     f"{_fmt(values['BWT'], True)} | {_fmt(values['FWT'], True)} | {_fmt(values['forgetting'])} | "
                     f"{train:.0f} | {f'{max(peaks):.2f}' if peaks else 'not measured'} |")
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


def setting_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


def _value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def reference(entry: dict[str, Any], sweep: dict[tuple[str, str], dict[str, Any]],
              main: dict[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any] | None, str, dict[str, tuple]]:
    """``(reference run, where, other differences)`` of a sweep entry: of the sweep's own
    ``<method>_default`` on the entry's order and the comparison's run of the method there, the first
    whose configuration differs from the entry's only in the entry's settings; where neither does,
    the first that exists, with the other differences ``{setting: (entry's, reference's)}``."""
    order, method = entry["order"], entry["method"]
    candidates = [(sweep.get((order, f"{method}_default")), "sweep default"), (main.get((order, method)), "comparison run")]
    candidates = [(c, where) for c, where in candidates if c is not None]
    if not candidates:
        return None, "", {}
    changes = [(c, where, config_changes(entry, c, set(entry["settings"]))) for c, where in candidates]
    return next((c for c in changes if not c[2]), changes[0])


def _delta(entry: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    if ref is None:
        return "–"
    if ref is entry:
        return "0"
    a, b = entry["results"]["metrics"].get(key), ref["results"]["metrics"].get(key)
    return "–" if a is None or b is None else _fmt(a - b, True)


def _differences(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {_value(a)} here, {_value(b)} there" for k, (a, b) in changes.items())


def max_r_difference(r: list[list[float | None]], other: list[list[float | None]]) -> float:
    """Largest |difference| between two R matrices over the cells both have."""
    cells = [abs(a - b) for row, row_other in zip(r, other) if row and row_other
             for a, b in zip(row, row_other) if a is not None and b is not None]
    return max(cells, default=0.0)


def sweep_table(sweep: dict[tuple[str, str], dict[str, Any]], main: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Every sweep entry with its differences to its :func:`reference`."""
    lines = ["| order | method | setting | AA | BWT | FWT | forgetting | ΔAA | ΔBWT | reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (order, _), entry in sorted(sweep.items(), key=lambda kv: (kv[0][0], kv[1]["method"], kv[0][1])):
        method = entry["method"]
        ref, where, changes = reference(entry, sweep, main)
        m = entry["results"]["metrics"]
        if changes:
            where += f" (also differs: {_differences(changes)})"
        same = main.get((order, method))
        if same is not None and same is not ref and entry["results"].get("config") and not config_changes(entry, same):
            gap = max_r_difference(entry["results"]["R"], same["results"]["R"])
            where += "; the same configuration as the comparison run" + (
                ", the same R" if gap == 0 else f", R differs by up to {gap:.1f}")
        lines.append(f"| {order} | {method} | {setting_text(entry['settings'])} | {_fmt(m['AA'])} | "
                     f"{_fmt(m['BWT'], True)} | {_fmt(m['FWT'], True)} | {_fmt(m['forgetting'])} | "
                     f"{_delta(entry, ref, 'AA')} | {_delta(entry, ref, 'BWT')} | {where} |")
    return lines


def sensitivity_table(sweep: dict[tuple[str, str], dict[str, Any]], main: dict[tuple[str, str], dict[str, Any]],
                      method: str) -> list[str]:
    """One row per setting of ``method``'s sweep, one column per order it ran on: ``AA / BWT
    (ΔAA / ΔBWT)`` against the entry's :func:`reference` (empty where the setting did not run)."""
    entries = [e for e in sweep.values() if e["method"] == method]
    orders = sorted({e["order"] for e in entries})
    settings: list[str] = []
    for entry in entries:  # in the order the sweeps listed them, the default first
        text = setting_text(entry["settings"])
        if text not in settings:
            settings.append(text)
    settings.sort(key=lambda t: t != "(defaults)")
    lines = [f"| {method}: setting | " + " | ".join(f"order {o}" for o in orders) + " |",
             "|---|" + "---|" * len(orders)]
    for text in settings:
        cells = []
        for order in orders:
            entry = next((e for e in entries if e["order"] == order and setting_text(e["settings"]) == text), None)
            if entry is None:
                cells.append("")
                continue
            ref, _, _ = reference(entry, sweep, main)
            m = entry["results"]["metrics"]
            cell = _fmt(m["AA"]) + ("" if m.get("BWT") is None else f" / {_fmt(m['BWT'], True)}")
            if ref is not None and ref is not entry:
                cell += f" ({_delta(entry, ref, 'AA')} / {_delta(entry, ref, 'BWT')})"
            cells.append(cell)
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    compared = [main.get((o, method)) for o in orders]
    if any(compared):
        lines.append("| comparison run | " + " | ".join(
            "" if c is None else _fmt(c["results"]["metrics"]["AA"])
            + ("" if c["results"]["metrics"].get("BWT") is None else f" / {_fmt(c['results']['metrics']['BWT'], True)}")
            for c in compared) + " |")
    return lines


def sweep_bases(sweep: dict[tuple[str, str], dict[str, Any]], main: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Where a sweep's default differs from the comparison's run of its method on the same order:
    the sweep then measured around other defaults than the comparison's, which must be said."""
    lines = []
    for (order, label), entry in sorted(sweep.items()):
        if label != f"{entry['method']}_default" or (order, entry["method"]) not in main:
            continue
        changes = config_changes(entry, main[(order, entry["method"])])
        if changes:
            lines.append(f"- order {order}: the sweep's {entry['method']} default ran with "
                         + ", ".join(f"{k} {_value(a)}" for k, (a, _) in changes.items()) + "; the comparison's "
                         + entry["method"] + " with " + ", ".join(f"{k} {_value(b)}" for k, (_, b) in changes.items()))
    return lines


def identical_runs(sweep: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Sweep entries of one order and method with the very same R: their settings act as one."""
    lines = []
    groups: dict[tuple[str, str, str], list[str]] = {}
    for entry in sweep.values():
        groups.setdefault((entry["order"], entry["method"], json.dumps(entry["results"]["R"])), []).append(
            setting_text(entry["settings"]))
    for (order, method, _), texts in sorted(groups.items()):
        if len(texts) > 1:
            lines.append(f"- order {order}, {method}: {' and '.join(sorted(texts))} gave the same R, entry for entry")
    return lines


def sampling_error(main: dict[tuple[str, str], dict[str, Any]], budgets: dict[str, Any],
                   what: str = "of one run's AA") -> list[str]:
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
    return [f"Sampling error {what} (binomial standard error; a BWT has about √2 times it): "
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
                changed = setting_text(best["settings"]).replace("(defaults)", "the defaults")
                lines.append(f"- order {order}, {method}: highest {key} "
                             f"{_fmt(best['results']['metrics'][key], key != 'AA')} "
                             f"with {changed} (of {len(scored)} settings)")
    return lines


def write_report(dirs: list[Path], results_dir: Path, tag: str, notes: str | None = None) -> str:
    """Write ``quality_<tag>.md``, ``quality_<tag>.json`` and the comparison's heatmaps into
    ``results_dir``; ``notes`` (markdown) goes right after the header."""
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
    if notes:
        out += [notes.strip(), ""]
    if main:
        out += ["## Methods, averaged over orders", ""] + method_table(main, methods, orders) + [""]
        out += ["## AA / BWT per order", ""] + order_table(main, methods, orders) + [""]
        out += sampling_error(main, budgets) + [""]
        out += ["## Targets", ""] + targets(main, orders) + [""]
    if sweep:
        out += ["## Sweep: sensitivity to each setting", "",
                "Each cell: AA / BWT of the setting on that order (ΔAA / ΔBWT against the sweep's default on the "
                "same order, or the comparison's run where the sweep has no default there). Settings are those "
                "changed from the defaults of the run; the last row is the method comparison's run."]
        out += [""] + sweep_bases(sweep, main) if sweep_bases(sweep, main) else []
        out += [""] + sampling_error(sweep, budgets, "of one sweep run's AA") + [
            "Two runs scored on the same test examples differ by less than √2 times that from sampling alone.", ""]
        for method in sorted({e["method"] for e in sweep.values()}):
            out += sensitivity_table(sweep, main, method) + [""]
        out += identical_runs(sweep) + [""] if identical_runs(sweep) else []
        out += ["### Every sweep run", ""] + sweep_table(sweep, main) + [""]
        out += best_settings(sweep) + [""]
    replaced = [(k, e) for k, e in sorted(finished.items()) if e["replaced"]]
    if replaced:
        out += ["## Runs of one key in several directories", ""] + [
            f"- {k}: the run in {e['directory']} is reported; it differs from the one in {', '.join(e['replaced'])}"
            for k, e in replaced] + [""]
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
                image.write_bytes(heatmap(f"{method}, order {order}", result["tasks"], result["R"]))
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
