"""Instruction and chat tasks derived from CL_Benchmark files, for the mixed-kind sequence of
bench/quality.py (issue: tasks of several kinds in one sequence, on real text).

The shared CL_Benchmark copy holds classification tasks only. Its topic and review ``sentence``s are
``Title: <title>\\nText: <text>``, so two free-form tasks come from them without new data:

- ``GEN/agnews_headline`` (instruction, ROUGE-L): write the news article's headline from its text;
  a short free-form generation scored by overlap, like the summarisation tasks of TRACE-style
  sequences.
- ``GEN/dbpedia_name`` (chat, exact match): name the subject an encyclopedia passage is about;
  an extraction answer rendered with the tokenizer's chat template.

:func:`build_data_dir` writes them under ``<out>/GEN/`` next to links to the source data's type
folders, so one ``--data-dir`` serves the CL_Benchmark tasks and the derived ones. The files are
generated on the machine that runs the benchmark and never committed. Records are taken in file
order (the first ``cap`` with a usable title), so every run and seed sees the same task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DERIVED", "build_data_dir", "split_title"]

TRAIN_CAP = 2000
TEST_CAP = 300


def split_title(sentence: str) -> tuple[str, str] | None:
    """``(title, text)`` of a ``Title: …\\nText: …`` sentence, or None where either part is empty."""
    if not sentence.startswith("Title:") or "\nText:" not in sentence:
        return None
    head, _, text = sentence.partition("\nText:")
    title, text = head[len("Title:"):].strip(), " ".join(text.replace("\\", " ").split())
    return (title, text) if title and text else None


def _headline(title: str, text: str) -> dict[str, Any]:
    return {"instruction": "Write a short headline for this news article.", "input": text, "output": title}


def _name(title: str, text: str) -> dict[str, Any]:
    question = f"Who or what is this passage about? Answer with the name only.\n\n{text}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": title}]}


# name -> (source task, record builder, task.json declaration)
DERIVED: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "agnews_headline": ("TC/agnews", _headline, {"kind": "instruction", "metric": "rougeL", "max_new_tokens": 24}),
    "dbpedia_name": ("TC/dbpedia", _name, {"kind": "chat", "metric": "exact_match", "max_new_tokens": 16}),
}


def _records(path: Path, build: Any, cap: int) -> list[dict[str, Any]]:
    records = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        parts = split_title(row.get("sentence", ""))
        if parts is not None:
            records.append(build(*parts))
        if len(records) == cap:
            break
    return records


def build_data_dir(source: Path, out: Path) -> Path:
    """``out`` holding a link to each type folder of ``source`` and the derived tasks under
    ``GEN/``; returns ``out``. Raises ``FileNotFoundError`` naming a missing source file."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        link = out / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    for name, (task, build, declaration) in DERIVED.items():
        target = out / "GEN" / name
        target.mkdir(parents=True, exist_ok=True)
        for split, cap in (("train", TRAIN_CAP), ("test", TEST_CAP)):
            path = source / task / f"{split}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the derived task GEN/{name} is built from it")
            lines = [json.dumps(r, ensure_ascii=False) for r in _records(path, build, cap)]
            (target / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (target / "task.json").write_text(json.dumps(declaration), encoding="utf-8")
    return out
