"""A mixed sequence through the real runner (one 2-rank CPU launch): a classification task (CL_Benchmark
folder, accuracy), an instruction JSONL task scored by ROUGE-L and a chat task scored by exact match.
Every entry of R is recomputed from the predictions files by an implementation of each metric written
here (a word LCS for ROUGE-L over rouge-score's tokenisation; string comparison for the others)."""

from __future__ import annotations

import json
import re
import shutil
import string
import unicodedata
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import clean_env, launch_train

pytestmark = pytest.mark.slow

EVAL_SAMPLES = 6
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
WORDS = ["red", "blue", "green", "cat", "dog", "horse", "apple", "lemon", "cup", "hat", "box", "pen"]


def _data(root: Path) -> Path:
    cls = root / "TC" / "colours"
    cls.mkdir(parents=True)
    (cls / "labels.json").write_text(json.dumps(["vex", "nar"]))
    for split in ("train", "test"):
        rows = [{"sentence": f"the {WORDS[i % 12]} one", "label": ["vex", "nar"][i % 2]} for i in range(12)]
        (cls / f"{split}.json").write_text(json.dumps(rows))
    instr = root / "GEN" / "repeat"
    instr.mkdir(parents=True)
    (instr / "task.json").write_text(json.dumps({"kind": "instruction", "metric": "rougeL", "max_new_tokens": 8}))
    # the answer: "the" and the input's first word (a tiny model learns the first part within the budget,
    # so ROUGE-L is neither 0 nor 100)
    for split, offset in (("train", 0), ("test", 5)):
        lines = [json.dumps({"instruction": "Say it.", "input": " ".join(WORDS[(i + offset + k) % 12] for k in range(3)),
                             "output": f"the {WORDS[(i + offset) % 12]}"}) for i in range(12)]
        (instr / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    chat = root / "CHAT" / "name"
    chat.mkdir(parents=True)
    (chat / "task.json").write_text(json.dumps({"kind": "chat", "metric": "exact_match", "max_new_tokens": 4}))
    records = [{"messages": [{"role": "user", "content": f"Name the word: {w}"},
                             {"role": "assistant", "content": "vex" if i % 3 else "nar"}]} for i, w in enumerate(WORDS)]
    (chat / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (chat / "test.json").write_text(json.dumps(records))
    return root


# --------------------------------------------------------------------- the metrics, written independently
def _normalise(text: str, first_line: bool) -> str:
    text = text.lstrip()
    if first_line:
        text = text.split("\n", 1)[0]
    kept = "".join(c for c in text.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l(prediction: str, reference: str) -> float:
    pred, ref = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (prediction, reference))
    common = _lcs(pred, ref)
    if not pred or not ref or common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 100.0 * 2 * p * r / (p + r)


RECOMPUTE = {
    "accuracy": lambda g, ref: 100.0 * (_normalise(g, True) == _normalise(ref, True)),
    "exact_match": lambda g, ref: 100.0 * (_normalise(g, False) == _normalise(ref, False)),
    "rougeL": _rouge_l,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    model = tmp_path_factory.mktemp("chat_model") / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = _data(tmp_path_factory.mktemp("kinds_data"))
    out = tmp_path_factory.mktemp("kinds_run")
    proc = launch_train(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(model),
                         "--data-dir", str(data), "--tasks", "colours,repeat,name", "--method", "seq-ft",
                         "--max-steps-per-task", "30", "--eval-samples", str(EVAL_SAMPLES), "--global-batch-size", "4",
                         "--micro-batch-size", "2", "--lr-plain", "3e-3", "--export", "false", "--output-dir", str(out)],
                        env=clean_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # the closing comparison names the scale: the columns are not all accuracies
    assert "methods compared (each task's own metric, 0-100," in proc.stdout + proc.stderr
    return out / "seq-ft"


def test_each_r_entry_is_its_tasks_metric_recomputed_from_the_predictions(run) -> None:
    result = json.loads((run / "results.json").read_text())
    assert result["tasks"] == ["colours", "repeat", "name"]
    assert result["task_metrics"] == ["accuracy", "rougeL", "exact_match"]
    seen = {}
    for i, row in enumerate(result["R"]):
        assert row is not None
        for j, (task, metric) in enumerate(zip(result["tasks"], result["task_metrics"])):
            records = [json.loads(line) for line in (run / result["predictions"][i][j]).read_text().splitlines()]
            assert [r["index"] for r in records] == list(range(EVAL_SAMPLES))
            scores = [RECOMPUTE[metric](r["generation"], r["label"]) for r in records]
            for r, score in zip(records, scores):
                assert r["score"] == pytest.approx(score, abs=1e-9), (task, r)
            assert row[j] == pytest.approx(sum(scores) / len(scores), abs=1e-3), (i, task, scores)
            seen.setdefault(metric, []).extend(scores)
    # the chat task's references are the last assistant messages; the instruction task's the outputs
    name = [json.loads(line) for line in (run / result["predictions"][0][2]).read_text().splitlines()]
    assert all(r["input"].startswith("Name the word: ") and r["label"] in ("vex", "nar") for r in name)
    repeat = [json.loads(line) for line in (run / result["predictions"][0][1]).read_text().splitlines()]
    assert all(r["label"] == "the " + r["input"].split()[0] for r in repeat)
    # the metrics table names the metric of each column
    assert "repeat (rougeL)" in (run / "results.md").read_text() and "name (exact_match)" in (run / "results.md").read_text()
    # the comparison is not vacuous: each metric scored some answers above 0 (the budget is chosen so
    # that the tiny model learns "the …", "vex"/"nar": ROUGE-L 50 for "the" alone)
    assert all(max(scores) > 0 for scores in seen.values()), result["R"]
    assert any(0 < score < 100 for score in seen["rougeL"]), result["R"]
