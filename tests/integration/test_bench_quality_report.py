"""bench/quality.py's report on hand-made run directories: averages over orders recomputed from R by
hand, the targets' verdicts, the sweep's differences to its reference, what is missing, and a bad
sweep setting refused with a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

sys.path.insert(0, str(REPO))

from bench.quality_report import write_report  # noqa: E402

TASKS = ["t1", "t2", "t3"]


def _r(diagonal: float, final: list[float]) -> list[list[float]]:
    """R with row 0 = 0, row i holding ``diagonal`` on its task, and the given last row."""
    rows = [[0.0, 0.0, 0.0]]
    for i in range(1, 3):
        rows.append([diagonal if j == i - 1 else 10.0 * i for j in range(3)])
    rows.append(final)
    return rows


def _write_run(out: Path, group: str, order: str, method: str, label: str, r, settings=None, train_s=10.0,
               config=None):
    safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in label)
    directory = out / group / order / safe / method
    directory.mkdir(parents=True, exist_ok=True)
    from gorp_ds.cl.metrics import all_metrics

    result = {"method": method, "tasks": TASKS, "R": r, "metrics": all_metrics(r),
              "timings": {"train_s": train_s}, "peak_memory_gib": 1.5}
    if config is not None:  # as the runner writes it: every setting, the output directory among them
        result["config"] = {**config, "output_dir": str(directory.parent), "method": method}
    (directory / "results.json").write_text(json.dumps(result))
    record = {"run": f"{group}/{order}/{label}", "group": group, "order": order, "method": method, "label": label,
              "settings": settings or {}, "status": "done", "max_concurrent": 5}
    with open(out / "runs.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def test_report_averages_targets_and_sweep(tmp_path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    runs = []
    # gorp keeps its diagonal (BWT from the last row), o-lora forgets more, seq-lora more still.
    finals = {("A", "gorp"): [80.0, 70.0, 90.0], ("B", "gorp"): [78.0, 72.0, 90.0],
              ("A", "o-lora"): [70.0, 60.0, 90.0], ("B", "o-lora"): [76.0, 60.0, 90.0],
              ("A", "seq-lora"): [60.0, 65.0, 90.0], ("B", "seq-lora"): [79.0, 61.0, 90.0]}
    for (order, method), final in finals.items():
        runs.append(_write_run(out, "main", order, method, method, _r(80.0, final)))
    mtl = [[0.0, 0.0, 0.0], None, None, [85.0, 75.0, 92.0]]
    runs.append(_write_run(out, "main", "A", "mtl", "mtl", mtl))
    runs.append(_write_run(out, "sweep", "A", "gorp", "gorp_default", _r(80.0, [80.0, 70.0, 90.0])))
    runs.append(_write_run(out, "sweep", "A", "gorp", "gorp_k=4", _r(80.0, [74.0, 70.0, 90.0]), {"rank": 4}))
    plan = {"budgets": {"A": [100, 300], "B": [60, 200]}, "global_batch": 16, "smoke": False,
            "runs": [{k: r[k] for k in ("group", "order", "method", "label", "settings")} for r in runs]
            + [{"group": "main", "order": "B", "method": "mtl", "label": "mtl", "settings": {}}]}
    (out / "plan.json").write_text(json.dumps(plan))

    text = write_report([out], tmp_path / "results", "test")

    def aa(final):
        return sum(final) / 3

    def bwt(final):
        return ((final[0] - 80.0) + (final[1] - 80.0)) / 2

    gorp_aa = (aa(finals[("A", "gorp")]) + aa(finals[("B", "gorp")])) / 2
    gorp_bwt = (bwt(finals[("A", "gorp")]) + bwt(finals[("B", "gorp")])) / 2
    row = next(line for line in text.splitlines() if line.startswith("| gorp | A,B |"))
    assert f"| {gorp_aa:.1f} | {gorp_bwt:+.1f} |".replace("-", "−") in row, row
    assert "| 10 | 1.50 |" in row  # train seconds (mean), peak memory (max)
    olora_aa = (aa(finals[("A", "o-lora")]) + aa(finals[("B", "o-lora")])) / 2
    assert f"gorp AA ≥ o-lora AA + 3 (mean over A,B): {gorp_aa - olora_aa:+.1f} points → met" in text
    assert "gorp BWT ≥ −1 on every order" in text and "not met" in text.split("gorp BWT")[1].splitlines()[0]
    assert f"gorp AA within 1 point of mtl (mean over A): {aa(finals[('A', 'gorp')]) - aa([85.0, 75.0, 92.0]):+.1f}" \
        .replace("-", "−") in text
    # o-lora ≥ seq-lora on A (−15 vs −17.5) but not on B (−12 vs −10): not met.
    assert "o-lora BWT ≥ seq-lora BWT on every order: A −15.0 vs −17.5, B −12.0 vs −10.0 → not met" in text
    sweep_row = next(line for line in text.splitlines() if line.startswith("| A | gorp | rank=4 |"))
    assert "| −2.0 | −3.0 | sweep default |" in sweep_row, sweep_row  # ΔAA = −6/3, ΔBWT = −6/2
    assert "| rank=4 | 78.0 / −8.0 (−2.0 / −3.0) |" in text  # the sensitivity table: AA / BWT (ΔAA / ΔBWT)
    finals_a = [f for (o, _), f in finals.items() if o == "A"] + [[85.0, 75.0, 92.0]]
    se_a = sum((sum(v / 100 * (1 - v / 100) / 300 for v in f) ** 0.5) * 100 / 3 for f in finals_a) / len(finals_a)
    assert f"order A (300 test examples per task): ±{se_a:.1f}" in text
    assert "- order A, gorp: highest AA 80.0 with the defaults (of 2 settings)" in text
    assert "- main/B/mtl: not run" in text
    assert (tmp_path / "results" / "quality_test_A_gorp_R.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results" / "quality_test.json").read_text())
    assert saved["runs"]["main/A/gorp"]["metrics"]["AA"] == pytest.approx(aa(finals[("A", "gorp")]))


def _plan(out: Path, runs: list[dict]) -> None:
    plan = {"budgets": {"A": [100, 300], "B": [60, 200]}, "global_batch": 16, "smoke": False,
            "runs": [{k: r[k] for k in ("group", "order", "method", "label", "settings")} for r in runs]}
    (out / "plan.json").write_text(json.dumps(plan))


def test_report_merges_directories_and_compares_like_with_like(tmp_path) -> None:
    """Three directories as one benchmark writes them in stages: the comparison under new defaults
    (T 20), a first sweep around the old ones (T 10) on order A, a second with its own default on
    order B and a rerun of one A entry. Each entry is compared with the run of its order whose
    configuration differs only in the entry's settings; what else differs is named."""
    old = {"update_gap": 10, "rank": 8, "scale": 0.25, "lr_full": 5e-6, "olora_lambda": 0.5}
    new = {**old, "update_gap": 20}
    main, first, second = (tmp_path / name for name in ("main", "sweep1", "sweep2"))
    for directory in (main, first, second):
        directory.mkdir()
    runs = [_write_run(main, "main", order, method, method, _r(80.0, final), config=new)
            for order, method, final in (("A", "gorp", [80.0, 70.0, 90.0]), ("B", "gorp", [76.0, 70.0, 90.0]),
                                         ("B", "o-lora", [70.0, 60.0, 90.0]))]
    _plan(main, runs)
    runs = [_write_run(first, "sweep", "A", "gorp", "gorp_default", _r(80.0, [74.0, 70.0, 90.0]), config=old),
            _write_run(first, "sweep", "A", "gorp", "gorp_T=20", _r(80.0, [77.0, 70.0, 90.0]), {"update_gap": 20},
                       config=new),
            # lr and scale multiply into one step size: the same R
            _write_run(first, "sweep", "A", "gorp", "gorp_lr_full=2e-5", _r(80.0, [75.0, 71.0, 90.0]),
                       {"lr_full": 2e-5}, config={**old, "lr_full": 2e-5}),
            _write_run(first, "sweep", "A", "gorp", "gorp_scale=1", _r(80.0, [75.0, 71.0, 90.0]), {"scale": 1.0},
                       config={**old, "scale": 1.0}),
            # run under the new defaults: its like is the comparison's run, not the old sweep default
            _write_run(first, "sweep", "A", "gorp", "gorp_k=4", _r(80.0, [78.0, 70.0, 90.0]), {"rank": 4},
                       config={**new, "rank": 4}),
            _write_run(first, "sweep", "B", "o-lora", "o-lora_lambda1=2", _r(80.0, [73.0, 60.0, 90.0]),
                       {"olora_lambda": 2.0}, config={**old, "olora_lambda": 2.0})]
    _plan(first, runs)
    runs = [_write_run(second, "sweep", "B", "gorp", "gorp_default", _r(80.0, [70.0, 70.0, 90.0]), config=old),
            _write_run(second, "sweep", "B", "gorp", "gorp_T=20,k=4", _r(80.0, [73.0, 70.0, 90.0]),
                       {"update_gap": 20, "rank": 4}, config={**new, "rank": 4}),
            _write_run(second, "sweep", "A", "gorp", "gorp_T=20", _r(80.0, [77.0, 70.6, 90.0]), {"update_gap": 20},
                       config=new)]
    _plan(second, runs)

    text = write_report([main, first, second], tmp_path / "results", "merge", notes="## Notes\n\nHow it was chosen.")
    lines = text.splitlines()

    assert lines.index("## Notes") < lines.index("## Methods, averaged over orders")
    # AA and BWT of a final row (f1, f2, 90) after diagonals of 80: (f1 + f2 + 90) / 3 and (f1 + f2 − 160) / 2.
    # The defaults of each order come from the directory that ran them: A's from the first, B's from the second.
    assert "| (defaults) | 78.0 / −8.0 | 76.7 / −10.0 |" in text
    # T=20 on A: the second directory's rerun (its R differs) replaced the first's; against A's default.
    rerun = next(line for line in lines if line.startswith("| A | gorp | update_gap=20 |"))
    assert rerun.startswith("| A | gorp | update_gap=20 | 79.2 | −6.2 |"), rerun
    assert rerun.endswith("| +1.2 | +1.8 | sweep default; the same configuration as the comparison run, "
                          "R differs by up to 3.0 |"), rerun
    assert f"- sweep/A/gorp_T=20: the run in {second} is reported; it differs from the one in {first}" in text
    # k=4 ran under the new defaults: compared with the comparison's gorp on A (AA 80, BWT −5), not the old default.
    k4 = next(line for line in lines if line.startswith("| A | gorp | rank=4 |"))
    assert k4.endswith("| −0.7 | −1.0 | comparison run |"), k4
    # On B, T=20 with k=4 against B's own default (AA 76.7, BWT −10), not A's nor the comparison's.
    b = next(line for line in lines if line.startswith("| B | gorp | update_gap=20, rank=4 |"))
    assert b.endswith("| +1.0 | +1.5 | sweep default |"), b
    # o-lora has no sweep default: the comparison's run, with the settings that also differ named.
    olora = next(line for line in lines if line.startswith("| B | o-lora | olora_lambda=2.0 |"))
    assert olora.endswith("| +1.0 | +1.5 | comparison run (also differs: update_gap 10 here, 20 there) |"), olora
    assert "- order A: the sweep's gorp default ran with update_gap 10; the comparison's gorp with update_gap 20" in text
    assert "- order A, gorp: lr_full=2e-05 and scale=1.0 gave the same R, entry for entry" in text
    assert "| comparison run | 80.0 / −5.0 | 78.7 / −7.0 |" in text  # the gorp sensitivity table's last row


def test_bad_sweep_setting_is_one_line_error(tmp_path) -> None:
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"label": "x", "method": "gorp", "settings": {"epsilon_s": 0.5}}]))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--out", str(tmp_path / "o"),
                           "--data-dir", str(tmp_path), "--no-main", "--sweep", str(sweep)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gorp_ds: error: --sweep entry 'x': unknown setting 'epsilon_s'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_every_built_in_run_resolves_to_its_settings(tmp_path) -> None:
    """Each launch's argv goes through the runner's own parser: the budget is the issue's, the sweep
    changes exactly its setting, and the embedded model's preset supplies the rest."""
    import argparse

    from bench.quality import BUDGETS, EVAL_TASKS, METHODS, MIXED_TASKS, ORDERS, Run, command, load_sweeps
    from gorp_ds.cl import add_arguments, build_run_config

    args = argparse.Namespace(smoke=False, data_dir=str(tmp_path), eval_batch_size=64)
    runs = [Run("main", order, method, method) for order in ORDERS for method in METHODS]
    runs += load_sweeps("gorp,olora", ["A"])
    assert len(runs) == 18 + 15 + 4
    runs += load_sweeps(str(REPO / "bench" / "sweeps" / "quality_stage2.json"), ["A"])  # the committed stage 2
    assert len(runs) == 18 + 15 + 4 + 14
    # The O-LoRA authors' recipes (docs/algorithm.md §6), o-lora and seq-lora alike; some at 64 per step.
    runs += load_sweeps(str(REPO / "bench" / "sweeps" / "olora_authors.json"), ["A"])
    assert len(runs) == 18 + 15 + 4 + 14 + 18
    # The long and mixed-kind sequences, seeded (MIXED compares gorp, seq-lora and o-lora).
    runs += [Run("main", order, method, method, seed=seed) for seed in (1, 3) for order in ("SHARED10", "MIXED")
             for method in ("gorp", "mtl", "seq-lora", "o-lora") if order == "SHARED10" or method != "mtl"]
    for run in runs:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        argv = command(run, args, tmp_path, "embedded", tmp_path / "ds.json")[2:]  # after python launch/train.py
        cfg = build_run_config(parser.parse_args(argv))
        assert {k: cfg.value(k) for k in run.settings} == run.settings, run.key
        assert (cfg.runner.max_steps_per_task, cfg.data.eval_samples, cfg.runner.global_batch_size) == (
            *BUDGETS[run.order], run.settings.get("global_batch_size", 16))
        assert cfg.runner.methods == [run.method] and not cfg.runner.checkpoints
        if run.order == "MIXED":  # the derived tasks' directory, the sequence as tasks
            assert cfg.data.order is None and cfg.data.tasks == list(MIXED_TASKS)
            assert cfg.data.data_dir == str(tmp_path / "data")
        else:
            assert cfg.data.order == run.order and cfg.data.data_dir == str(tmp_path)
        assert cfg.data.eval_tasks == (list(EVAL_TASKS[run.order]) if run.order in EVAL_TASKS else None)
        assert cfg.data.seed == (0 if run.seed is None else run.seed)
        preset = {"lr_lora": 1e-3, "lr_full": 5e-6, "update_gap": 20, "shared_threshold": 0.99}
        for name, value in preset.items():  # the embedded preset's values where the run does not set its own
            if name not in run.settings and not (run.method != "gorp" and name == "shared_threshold"):
                assert cfg.value(name) == value and cfg.sources[name].startswith("preset embedded"), (run.key, name)
