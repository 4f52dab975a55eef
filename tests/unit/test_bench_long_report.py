"""bench/long_report.py on hand-made seeded runs (means and sample standard deviations computed by
hand, the targets' verdicts, unfinished runs listed) and bench/derived_tasks.py's instruction and
chat tasks, read back through the project's own task loader."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.support import REPO

sys.path.insert(0, str(REPO))

from bench.derived_tasks import build_data_dir, split_title  # noqa: E402
from bench.long_report import write_report  # noqa: E402
from gorp_ds.cl.metrics import all_metrics  # noqa: E402
from gorp_ds.data.task_files import load_task_folder  # noqa: E402

TASKS = ["t1", "t2"]


def _run(out: Path, order: str, method: str, seed: int, r: list[list[float]], eval_r: list[list[float]] | None,
         status: str = "done") -> None:
    rel = f"main/{order}/{method}/s{seed}"
    directory = out / rel / method
    directory.mkdir(parents=True, exist_ok=True)
    result = {"method": method, "tasks": TASKS, "task_metrics": ["accuracy", "rougeL"], "R": r,
              "metrics": all_metrics(r)}
    if eval_r is not None:
        final, first = eval_r[-1], eval_r[0]
        result["eval_tasks"] = {"tasks": ["e1"], "R": eval_r, "metrics": {
            "eval_mean": sum(final) / len(final),
            "generalisation": sum(a - b for a, b in zip(final, first)) / len(final)}}
    if status == "done":
        (directory / "results.json").write_text(json.dumps(result))
    record = {"run": f"main/{order}/{method}/s{seed}", "group": "main", "order": order, "method": method,
              "label": method, "seed": seed, "status": status, "output_dir": rel}
    with open(out / "runs.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def test_seed_means_deviations_and_targets(tmp_path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    # gorp: seeds give AA 70 and 74 (BWT −1 and −3); seq-lora forgets; mtl one row pair.
    _run(out, "SHARED10", "gorp", 1, [[10, 20], [60, 30], [60, 80]], [[40.0], [41.0], [44.0]])
    _run(out, "SHARED10", "gorp", 2, [[10, 20], [70, 30], [68, 80]], [[40.0], [40.0], [38.0]])
    _run(out, "SHARED10", "seq-lora", 1, [[10, 20], [70, 30], [50, 80]], [[40.0], [30.0], [20.0]])
    _run(out, "SHARED10", "mtl", 1, [[10, 20], None, [76, 80]], None)
    _run(out, "SHARED10", "o-lora", 1, [[0, 0], [0, 0], [0, 0]], None, status="stopped at the deadline")
    text = write_report([out], tmp_path / "results", "test")
    # gorp AA: (60+80)/2 = 70 and (68+80)/2 = 74 → 72 ± sd(70, 74) = 2·√2 = 2.83; BWT −0 and −2 → −1 ± 1.41.
    sd_aa, sd_bwt = math.sqrt(8), math.sqrt(2)
    # eval mean 44 and 38 → 41 ± 4.24; generalisation +4 and −2 → +1 ± 4.24.
    sd_eval = math.sqrt(18)
    row = next(line for line in text.splitlines() if line.startswith("| gorp | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == [f"72.0 ± {sd_aa:.1f}", f"−1.0 ± {sd_bwt:.1f}", "+10.0 ± 0.0", f"1.0 ± {sd_bwt:.1f}",
                         f"41.0 ± {sd_eval:.1f}", f"+1.0 ± {sd_eval:.1f}"], cells
    # One seed: no deviation; seq-lora AA (50+80)/2 = 65, BWT 50−70 = −20; generalisation 20−40.
    assert "| seq-lora | 1 | 65.0 | −20.0 | +10.0 | 20.0 | 20.0 | −20.0 |" in text
    assert "| mtl | 1 | 78.0 | – | – | – | – | – |" in text
    assert "- gorp AA ≥ mtl − 1: 72.0 vs 77.0: not met" in text
    assert "- gorp BWT ≥ −1: −1.0: met" in text
    assert "- gorp AA ≥ seq-lora + 3: 72.0 vs 65.0 (gap +7.0): met" in text
    assert "- main/SHARED10/o-lora/s1: stopped at the deadline" in text
    # The last row per task averages the seeds: t1 (60+68)/2 = 64, t2 80; metric names in the header.
    assert "| method | t1 (accuracy) | t2 (rougeL) |" in text and "| gorp | 64.0 | 80.0 |" in text
    saved = json.loads((tmp_path / "results" / "long_test.json").read_text())
    assert saved["summary"]["SHARED10/gorp"]["AA"] == {"mean": 72.0, "sd": sd_aa, "n": 2}
    assert saved["unfinished"] == ["main/SHARED10/o-lora/s1"]


def test_derived_tasks_load_through_the_task_loader(tmp_path) -> None:
    source = tmp_path / "cl"
    rows = [{"sentence": "Title: Rain ends drought\nText: Heavy rain\\fell over the plains.", "label": "World"},
            {"sentence": "no title here", "label": "World"},
            {"sentence": "Title: Ada Lovelace\nText:  Ada Lovelace was a mathematician.\n", "label": "Artist"}]
    for task in ("TC/agnews", "TC/dbpedia"):
        (source / task).mkdir(parents=True)
        for split in ("train", "test"):
            (source / task / f"{split}.json").write_text(json.dumps(rows))
        (source / task / "labels.json").write_text(json.dumps(["World", "Artist"]))
    data = build_data_dir(source, tmp_path / "data")
    assert (data / "TC" / "agnews").resolve() == (source / "TC" / "agnews").resolve()  # linked, not copied
    headline = load_task_folder(data / "GEN" / "agnews_headline")
    assert (headline.kind, headline.metric) == ("instruction", "rougeL")
    # The untitled row is skipped; the text's escaped line breaks become spaces.
    assert [(e.text, e.label) for e in headline.test] == [("Heavy rain fell over the plains.", "Rain ends drought"),
                                                          ("Ada Lovelace was a mathematician.", "Ada Lovelace")]
    name = load_task_folder(data / "GEN" / "dbpedia_name")
    assert (name.kind, name.metric) == ("chat", "exact_match")
    assert [e.label for e in name.train] == ["Rain ends drought", "Ada Lovelace"]
    assert name.train[1].messages[-1][0] == "user" and "Ada Lovelace was a mathematician." in name.train[1].messages[-1][1]
    assert split_title("Title: \nText: x") is None and split_title("Title: a\nText: ") is None
