"""The trained model out and predictions in, on one 2-rank ZeRO-2 launch of the tiny LLaMA (fp32,
so that "the same weights" can be asked bit for bit): gorp on two tasks with mid-task
checkpoints, an export after every task and at the end.

- the export is a plain Hugging Face directory, loaded by transformers alone in a fresh process,
  and its weights equal an independent float64 merge of the saved fp32 masters;
- ``--eval-only`` on the export (and on the checkpoint) reproduces the run's last row of R exactly
  and its predictions line for line, the eval tasks' (``--eval-tasks``, never trained) included:
  each eval-task score, under its named metric, equals that metric re-derived by hand from the
  predictions file (float64: word LCS for ROUGE-L, label match for accuracy);
- a checkpoint written on 2 ranks, mid-task (LoRA B ≠ 0), exports on 1 process to the float64
  merge of its masters (≤ 1e-6), and the final one bit-identically to the run's own export.
"""

from __future__ import annotations

import glob
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from tests.support.launch import clean_env, launch
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow

TASKS = ["emb_color", "emb_animal"]
# Never trained, one per metric: an embedded classification task (accuracy) and a free-form task
# folder written by the fixture (ROUGE-L; see _codes_task).
EVAL_TASKS = ["emb_fruit", "codes"]
ARGS = ["--method", "gorp", "--dtype", "fp32", "--tasks", ",".join(TASKS), "--max-steps-per-task", "12",
        "--save-every", "4", "--keep-checkpoints", "20", "--eval-samples", "16", "--lr-lora", "3e-2",
        "--lr-full", "3e-2", "--update-gap", "2", "--export-every-task", "true", "--eval-tasks", ",".join(EVAL_TASKS)]
MID_TASK_TAG = "task02_step000004"  # 4 steps into task 2: the adapter of task 2 is trained, not merged


def _fp32_ds_config(folder: Path) -> Path:
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.pop("bf16")
    config["tensorboard"]["enabled"] = False
    path = folder / "zero2_fp32.json"
    path.write_text(json.dumps(config))
    return path


def _codes_task(data_dir: Path) -> None:
    """``<data_dir>/codes``: a free-form (instruction, ROUGE-L) task on emb_fruit's 16 test inputs whose
    references hold two or three words, one of them "x": the tiny model often answers "x" or a code
    word, so its ROUGE-L scores are a mix of 0, 50 and 66.7, not all zero."""
    from gorp_ds.data.config import DataConfig
    from gorp_ds.data.registry import load_task_sequence

    fruit = load_task_sequence(DataConfig(tasks=["emb_fruit"], eval_samples=16))[0]
    folder = data_dir / "codes"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"kind": "instruction", "metric": "rougeL", "max_new_tokens": 4,
                                                  "instruction": fruit.instruction}))
    for split, examples in (("train", fruit.train[:2]), ("test", fruit.test[:16])):
        records = [{"input": e.text, "output": f"x {e.label}" if i % 2 == 0 else f"{e.label} zig x"}
                   for i, e in enumerate(examples)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("export_run")
    ds = _fp32_ds_config(root)
    _codes_task(root / "data")
    args = [*ARGS, "--data-dir", str(root / "data")]
    proc = launch(tiny_model_dir, root / "train", "--ds_config", str(ds), *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"root": root, "ds": ds, "args": args, "out": root / "train" / "gorp", "log": proc.stdout + proc.stderr}


def _eval_only(run: dict, model: Path, name: str, tiny_model_dir) -> Path:
    out = run["root"] / name
    proc = launch(tiny_model_dir, out, "--ds_config", str(run["ds"]), *run["args"], "--eval-only",
                  "--model", str(model))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "differs from the run that exported" not in proc.stdout + proc.stderr  # the run's own settings
    return out / "eval"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _reference_merge(tag_dir: Path, scaling: float, model_dir: Path) -> dict[str, torch.Tensor]:
    """Hugging Face weights re-derived in float64 from the base model's files and the checkpoint's
    raw files: frozen tensors from the model directory plus every finished task's recorded merge
    ``scaling · B_t A_t``, trained ones from the fp32 masters of both ranks' gorp_state pieces, and
    the current adapter ``scaling · B A`` (its masters) on every LoRA layer."""
    from safetensors.torch import load_file

    base = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        base.update(load_file(file))
    client = torch.load(tag_dir / "client_state.pt", map_location="cpu", weights_only=False)["client_state"]
    masters: dict[str, torch.Tensor] = {}
    pieces: dict[str, list] = {}
    for file in sorted(glob.glob(str(tag_dir / "gorp_state" / "rank_*.pt"))):
        for name, entry in torch.load(file, map_location="cpu", weights_only=True)["pieces"].items():
            pieces.setdefault(name, []).append(entry)
    for name, entries in pieces.items():
        numel = max(int(e["elem_end"]) for e in entries)
        flat = torch.full((numel,), float("nan"), dtype=torch.float64)
        for e in entries:
            flat[int(e["elem_start"]) : int(e["elem_end"])] = e["master"].double()
        assert not flat.isnan().any(), name
        masters[name] = flat
    reference = {}
    for key, value in base.items():
        name = key.removesuffix(".weight")
        if name in masters:
            reference[key] = masters[name].view(value.shape)
            continue
        weight = value.double()
        for record in client["lora_merges"]:
            if name in record:
                weight = weight + float(record[name]["scaling"]) * (record[name]["B"].double() @ record[name]["A"].double())
        if f"{name}.lora_A" in masters:
            a, b = masters[f"{name}.lora_A"], masters[f"{name}.lora_B"]
            rank = a.numel() // value.shape[1]
            weight = weight + scaling * (b.view(value.shape[0], rank) @ a.view(rank, value.shape[1]))
        reference[key] = weight
    return reference


def test_export_is_a_plain_hf_directory(run) -> None:
    export = run["out"] / "export"
    assert (export / "model.safetensors").is_file()
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= {p.name for p in export.iterdir()}
    assert not list(export.glob("adapter_*"))  # no PEFT files
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and config["use_cache"] is True
    tensors = _safetensors(export)
    assert not [k for k in tensors if "lora" in k or "base_layer" in k or k.startswith("base_model")]
    # the per-task exports exist, and the last one is the final export
    assert (export / "task_01" / "model.safetensors").is_file()
    last = _safetensors(export / "task_02")
    assert all(torch.equal(last[k], tensors[k]) for k in tensors)
    first = _safetensors(export / "task_01")
    assert any(not torch.equal(first[k], tensors[k]) for k in tensors)  # task 2 changed the weights
    result = json.loads((run["out"] / "results.json").read_text())
    assert result["exports"]["final"]["path"] == "export" and result["exports"]["final"]["bytes"] > 0
    assert "exported " in run["log"] and " s" in run["log"]  # time and size are logged


FRESH = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
assert not [m for m in sys.modules if m.startswith(("gorp_ds", "peft"))], "the export must load without gorp_ds or PEFT"
ids = torch.tensor([tokenizer("my red old horse")["input_ids"]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"ids": ids, "logits": logits, "class": type(model).__name__,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}, sys.argv[2])
'''


def test_export_loads_with_plain_transformers_in_a_fresh_process(run, tmp_path, tiny_model_dir) -> None:
    export = run["out"] / "export"
    out = tmp_path / "fresh.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(export), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out, weights_only=False)
    assert fresh["class"] == "LlamaForCausalLM"
    final_tag = (run["out"] / "checkpoints" / "latest").read_text().strip()
    result = json.loads((run["out"] / "results.json").read_text())
    scaling = result["config"]["lora_alpha"] / result["config"]["lora_r"]
    reference = _reference_merge(run["out"] / "checkpoints" / final_tag, scaling, tiny_model_dir)
    for key, value in reference.items():
        assert (fresh["state"][key].double() - value).abs().max() <= 1e-6, key


def _words(text: str) -> list[str]:
    """rouge-score's tokens: lower case, runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _rouge_l_by_hand(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure × 100 in float64 from the word LCS (dynamic programme); 0 for an empty side."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return 0.0
    lcs = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 100.0 * 2 * precision * recall / (precision + recall)


def _accuracy_by_hand(prediction: str, label: str) -> float:
    """100 when the generation's first line, lower case, ASCII punctuation and surplus spaces removed,
    is the label word (the embedded tasks' texts are ASCII)."""
    def norm(text: str) -> str:
        first = text.lstrip().split("\n", 1)[0].lower()
        return " ".join("".join(c for c in first if c not in string.punctuation).split())

    return 100.0 if norm(prediction) == norm(label) else 0.0


BY_HAND = {"accuracy": _accuracy_by_hand, "rougeL": _rouge_l_by_hand}


def test_eval_only_on_the_export_reproduces_the_last_row(run, tiny_model_dir) -> None:
    result = json.loads((run["out"] / "results.json").read_text())
    ran = result["eval_tasks"]
    assert ran["tasks"] == EVAL_TASKS and ran["task_metrics"] == ["accuracy", "rougeL"]
    assert len(ran["R"]) == len(TASKS) + 1
    rouge_scores = []
    models = (run["out"] / "export", run["out"])  # the exported directory, then the checkpoint
    evaluations = side_by_side(*(lambda model=model: _eval_only(run, model, f"eval_{model.name}", tiny_model_dir)
                                 for model in models))
    for model, evaluated in zip(models, evaluations):
        again = json.loads((evaluated / "results.json").read_text())
        assert again["tasks"] == TASKS
        assert again["R"] == [result["R"][-1]]
        assert (evaluated / "results.md").is_file()
        # The eval tasks: the run's last row of their matrix, under each task's named metric, and
        # each score the metric re-derived by hand from the eval-only predictions file.
        section = again["eval_tasks"]
        assert section["tasks"] == EVAL_TASKS and section["task_metrics"] == ran["task_metrics"]
        assert section["R"] == [ran["R"][-1]], model
        for k, (task, metric) in enumerate(zip(EVAL_TASKS, section["task_metrics"])):
            assert section["predictions"][0][k] == f"predictions/eval_{len(TASKS) + k + 1:02d}_{task}.jsonl"
            eval_lines = _lines(evaluated / section["predictions"][0][k])
            assert len(eval_lines) == 16 and eval_lines == _lines(run["out"] / ran["predictions"][-1][k]), (model, task)
            scores = [BY_HAND[metric](r["generation"], r["label"]) for r in eval_lines]
            # rows are rounded to 4 decimals after a float32 all-reduce of the two ranks' sums
            assert section["R"][0][k] == pytest.approx(sum(scores) / len(scores), abs=1e-3), (model, task)
            if metric == "rougeL":
                rouge_scores += scores
        assert section["metrics"]["eval_mean"] == pytest.approx(sum(section["R"][0]) / len(EVAL_TASKS), abs=1e-12)
        assert section["metrics"]["generalisation"] is None  # one row: nothing measured before training
        table = (evaluated / "results.md").read_text()
        assert "Eval tasks (never trained):" in table and "| emb_fruit (accuracy) | codes (rougeL) |" in table
        for j, task in enumerate(TASKS):
            run_lines = _lines(run["out"] / result["predictions"][-1][j])
            eval_lines = _lines(evaluated / again["predictions"][0][j])
            assert len(run_lines) == 16 and eval_lines == run_lines, (model, task)
            assert {"index", "input", "label", "generation", "prediction", "correct"} <= set(run_lines[0])
            accuracy = 100.0 * sum(r["correct"] for r in run_lines) / len(run_lines)
            assert accuracy == pytest.approx(result["R"][-1][j], abs=1e-9)
    # the generations are not trivially empty: there is something to compare line by line
    all_lines = [r for j in range(len(TASKS)) for r in _lines(run["out"] / result["predictions"][-1][j])]
    assert len({r["generation"] for r in all_lines}) > 1
    assert sum(rouge_scores) > 0  # the by-hand ROUGE-L compared something other than zeros


def test_predictions_for_every_entry_of_r(run) -> None:
    result = json.loads((run["out"] / "results.json").read_text())
    assert len(result["predictions"]) == len(TASKS) + 1
    for i, row in enumerate(result["R"]):
        for j, path in enumerate(result["predictions"][i]):
            lines = _lines(run["out"] / path)
            assert [r["index"] for r in lines] == list(range(16))  # test-set order, gathered from both ranks
            assert 100.0 * sum(r["correct"] for r in lines) / 16 == pytest.approx(row[j], abs=1e-9)


def _export_on_one_process(checkpoint: Path, out: Path) -> None:
    env = clean_env(PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "gorp_ds.export", str(checkpoint), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_two_rank_checkpoint_exports_on_one_process(run, tmp_path, tiny_model_dir) -> None:
    result = json.loads((run["out"] / "results.json").read_text())
    scaling = result["config"]["lora_alpha"] / result["config"]["lora_r"]
    # mid-task: the adapter is trained and unmerged, so the export's merge is what is tested
    tag_dir = run["out"] / "checkpoints" / MID_TASK_TAG
    # the mid-task checkpoint and the final one (below), exported side by side
    side_by_side(lambda: _export_on_one_process(tag_dir, tmp_path / "mid"),
                 lambda: _export_on_one_process(run["out"], tmp_path / "final"))
    exported = _safetensors(tmp_path / "mid")
    reference = _reference_merge(tag_dir, scaling, tiny_model_dir)
    assert sorted(exported) == sorted(reference)
    from gorp_ds.zero import read_masters

    b_norm = sum(float(v.abs().sum()) for k, v in read_masters(str(tag_dir.parent), tag_dir.name).items()
                 if k.endswith(".lora_B"))
    assert b_norm > 0, "the mid-task checkpoint should hold a trained adapter"
    for key, value in reference.items():
        assert exported[key].dtype == torch.float32
        assert (exported[key].double() - value).abs().max() <= 1e-6, key
    # the final checkpoint (the method's output directory) exports to the run's own export, bit for bit
    final, own = _safetensors(tmp_path / "final"), _safetensors(run["out"] / "export")
    assert sorted(final) == sorted(own)
    assert all(torch.equal(final[k], own[k]) for k in own)
    # with the same prompt record as the run's own export (the run's tasks, loaded from its settings)
    record = json.loads((run["out"] / "export" / "gorp_ds_prompt.json").read_text())
    assert json.loads((tmp_path / "final" / "gorp_ds_prompt.json").read_text()) == record


# ------------------------------------------------------------- per-task PEFT adapters and the prompt record
def _prompts(run: dict, count: int = 3) -> list[tuple[str, str]]:
    """``(task, prompt)`` for the first test inputs of each task, from the prompt record and the
    run's own predictions files (which hold the inputs the run evaluated)."""
    record = json.loads((run["out"] / "export" / "gorp_ds_prompt.json").read_text())
    result = json.loads((run["out"] / "results.json").read_text())
    prompts = []
    for j, entry in enumerate(record["tasks"]):
        for line in _lines(run["out"] / result["predictions"][-1][j])[:count]:
            prompts.append((entry["name"], entry["template"].replace(record["input_slot"], line["input"])))
    return prompts


def test_task_adapters_with_the_full_delta_give_each_tasks_export(run, tiny_model_dir) -> None:
    """For each task: the model it was trained on (the base model for task 1, the export after task 1
    for task 2), plus ``full_delta``, with ``PeftModel.from_pretrained(adapter)``, gives the logits of
    that task's merged export (fp32, ≤ 1e-5); the adapter holds exactly the fp32 factors the run
    merged (the checkpoint's merge record), the delta exactly the full targets' change between the
    two exports; leaving out either one misses the export by far more than the tolerance."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run["out"] / "export"
    result = json.loads((run["out"] / "results.json").read_text())
    final_tag = (run["out"] / "checkpoints" / "latest").read_text().strip()
    client = torch.load(run["out"] / "checkpoints" / final_tag / "client_state.pt", map_location="cpu",
                        weights_only=False)["client_state"]
    assert len(client["lora_merges"]) == 2
    tokenizer = AutoTokenizer.from_pretrained(export)
    inputs = [torch.tensor([tokenizer(p)["input_ids"]]) for _, p in _prompts(run)]
    full_keys = {f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)}  # --full-targets mlp.gate_proj

    def logits(model) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(input_ids=ids).logits for ids in inputs]

    def load(directory: Path, delta: dict[str, torch.Tensor] | None = None):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        with torch.no_grad():
            for key, value in (delta or {}).items():
                model.get_parameter(key).add_(value)
        return model

    assert not (run["out"] / ".task_start").exists()  # the task-start values are removed at the end
    for t, base_dir in ((1, tiny_model_dir), (2, export / "task_01")):
        task_dir = export / f"task_{t:02d}"
        assert sorted(p.name for p in (task_dir / "adapter").iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors"]
        config = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert config["r"] == result["config"]["lora_r"] and config["lora_alpha"] == result["config"]["lora_alpha"]
        factors = load_file(task_dir / "adapter" / "adapter_model.safetensors")
        merge = client["lora_merges"][t - 1]
        assert len(factors) == 2 * len(merge) == 8  # q_proj and v_proj of 2 layers
        for layer, record in merge.items():
            assert torch.equal(factors[f"base_model.model.{layer}.lora_A.weight"], record["A"])
            assert torch.equal(factors[f"base_model.model.{layer}.lora_B.weight"], record["B"])
        assert all(record["B"].abs().max() > 0 for record in merge.values())
        delta = load_file(task_dir / "full_delta.safetensors")
        assert set(delta) == full_keys and all(v.dtype == torch.float32 for v in delta.values())
        before, after = _safetensors(base_dir), _safetensors(task_dir)
        for key in full_keys:
            assert torch.equal(delta[key], after[key] - before[key]) and delta[key].abs().max() > 0, key

        want = logits(load(task_dir))  # the merged export of task t
        model = PeftModel.from_pretrained(load(base_dir, delta), str(task_dir / "adapter"))
        loaded = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        assert len(loaded) == len(factors)
        assert all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in factors.items())
        got = logits(model)
        worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
        assert worst <= 1e-5, (t, worst)
        with model.disable_adapter():  # base + delta alone: the adapter is needed
            assert max(float((g - w).abs().max()) for g, w in zip(logits(model), want)) > 1e-3
        without_delta = PeftModel.from_pretrained(load(base_dir), str(task_dir / "adapter"))
        assert max(float((g - w).abs().max()) for g, w in zip(logits(without_delta), want)) > 1e-3


def test_prompt_record_gives_the_run_prompts(run) -> None:
    """The record's templates filled with each test input are the prompts gorp_ds renders for them
    (``PromptFormat.prompt`` on the run's tasks), and every export directory has the same record."""
    from transformers import AutoTokenizer

    from gorp_ds.data.config import DataConfig
    from gorp_ds.data.prompting import PromptFormat
    from gorp_ds.data.registry import load_task_sequence
    from gorp_ds.data.tasks import Example

    export = run["out"] / "export"
    record = json.loads((export / "gorp_ds_prompt.json").read_text())
    for other in ("task_01", "task_02"):
        assert json.loads((export / other / "gorp_ds_prompt.json").read_text()) == record
    assert record["format"] == "plain" and record["chat_template"] is False and record["method"] == "gorp"
    assert record["add_special_tokens"] is True  # the tiny tokenizer has a BOS token
    tokenizer = AutoTokenizer.from_pretrained(export)
    tasks = load_task_sequence(DataConfig(tasks=TASKS, eval_samples=16))
    result = json.loads((run["out"] / "results.json").read_text())
    assert [e["name"] for e in record["tasks"]] == [t.name for t in tasks] == TASKS
    for j, (task, entry) in enumerate(zip(tasks, record["tasks"])):
        assert entry["labels"] == list(task.labels)
        # the budget evaluation used: the longest label (with its leading space) + EOS, in tokens
        longest = max(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in task.labels)
        assert entry["max_new_tokens"] == longest + 1
        lines = _lines(run["out"] / result["predictions"][-1][j])
        assert [line["input"] for line in lines] == [e.text for e in task.test[:16]]
        for example in task.test[:16]:
            expected = PromptFormat("plain").prompt(tokenizer, task, Example(example.text, example.label))
            assert entry["template"].replace(record["input_slot"], example.text) == expected


def _doc_snippet() -> str:
    """The "reproduce the predictions" snippet of docs/export.md (the python block after its marker)."""
    text = (REPO / "docs" / "export.md").read_text()
    after = text.split("<!-- snippet: predictions -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_doc_snippet_reproduces_the_run_predictions_with_transformers_alone(run, tmp_path) -> None:
    """docs/export.md's snippet (transformers only, in a fresh process without gorp_ds or PEFT on its
    path) turns the export and its prompt record into the run's last row of predictions: the same
    generation and normalised prediction for every test example of both tasks."""
    result = json.loads((run["out"] / "results.json").read_text())
    export = run["out"] / "export"
    snippet = _doc_snippet()
    assert 'export = "runs/x/gorp/export"' in snippet
    script = snippet.replace('export = "runs/x/gorp/export"', f"export = {str(export)!r}") + r'''
import sys
assert not [m for m in sys.modules if m.startswith(("gorp_ds", "peft"))]
out = {}
for entry, path in zip(record["tasks"], json.loads(sys.argv[1])):
    out[entry["name"]] = [predict(entry["name"], json.loads(line)["input"]) for line in open(path)]
json.dump(out, open(sys.argv[2], "w"))
'''
    paths = [str(run["out"] / p) for p in result["predictions"][-1]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(paths), str(tmp_path / "out.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reproduced = json.loads((tmp_path / "out.json").read_text())
    for task, path in zip(TASKS, paths):
        lines = _lines(Path(path))
        assert [list(pair) for pair in reproduced[task]] == [[r["generation"], r["prediction"]] for r in lines], task


# --------------------------------------------------------------------------- bf16: the engine's weights
# The six-method launch (made once per session) is bf16 on 2 ranks: gorp's export is checked against
# the weights its engine evaluates with, bit for bit. Ties (an fp32 master exactly halfway between two
# bf16 values) are where two roundings differ, and a trained master lands on one with probability
# 2^-16 per element, so a copy of the final checkpoint has every projected full-rank master
# (mlp.gate_proj) moved onto a tie: all of those elements are ties, counted below.


def _onto_ties(source: Path, target: Path) -> int:
    """Copy checkpoint folder ``source`` (``checkpoints/``, its ``latest`` tag only) to ``target``
    with every ``mlp.gate_proj`` master piece moved onto a bf16 tie (low 16 bits 0x8000) and the
    manifest's sizes and CRC-32s re-written; returns the number of tie elements."""
    import shutil
    import zlib

    tag = (source / "latest").read_text().strip()
    shutil.copytree(source / tag, target / tag)
    (target / "latest").write_text(tag + "\n")
    manifest_path = target / tag / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    ties = 0
    for file in sorted((target / tag / "gorp_state").glob("rank_*.pt")):
        payload = torch.load(file, map_location="cpu", weights_only=True)
        for name, entry in payload["pieces"].items():
            if name.endswith("mlp.gate_proj") and entry["master"].numel():
                bits = entry["master"].float().contiguous().view(torch.int32)
                entry["master"] = ((bits & ~0xFFFF) | 0x8000).view(torch.float32)
                ties += entry["master"].numel()
        torch.save(payload, file)
        data = file.read_bytes()
        manifest["files"][str(file.relative_to(target / tag))] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return ties


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_model_dir) -> dict:
    from tests.support.launch import deepspeed, free_port, six_method_run

    run_dir = six_method_run(tmp_path_factory, tiny_model_dir)
    root = tmp_path_factory.mktemp("export_bf16")
    ties = _onto_ties(run_dir / "gorp" / "checkpoints", root / "ties" / "checkpoints")
    cases = [(run_dir / "gorp", root / "run.pt", root / "run_export"),
             (root / "ties", root / "ties.pt", root / "ties_export")]
    command = [deepspeed(), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests" / "support" / "engine_weights.py"), *[str(p) for case in cases for p in case]]
    # beside it, the bf16 --eval-only of gorp's export (test_bf16_eval_only_...): independent launches
    proc, eval_proc = side_by_side(
        lambda: subprocess.run(command, cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True,
                               text=True, timeout=600),
        lambda: launch(tiny_model_dir, root / "eval_bf16", "--method", "gorp", "--eval-only", "--model",
                       str(run_dir / "gorp" / "export")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"run": run_dir, "root": root, "ties": ties, "cases": cases, "eval_proc": eval_proc}


def _equal_bits(export: dict[str, torch.Tensor], engine: dict[str, torch.Tensor]) -> None:
    assert set(export) <= set(engine) and set(engine) - set(export) <= {"lm_head.weight"}, set(engine) ^ set(export)
    for key, value in export.items():
        assert value.dtype == engine[key].dtype == torch.bfloat16, key
        assert torch.equal(value.view(torch.int16), engine[key].view(torch.int16)), key


def test_bf16_export_equals_the_engine_weights_bit_for_bit_ties_included(bf16_run) -> None:
    from gorp_ds.zero import read_masters

    (run_ckpt, run_pt, run_export), (ties_ckpt, ties_pt, ties_export) = bf16_run["cases"]
    # the run's own export (written by its 2-rank engine) and this launch's 2-rank export of the
    # same checkpoint: both equal the rebuilt engine's weights
    engine = torch.load(run_pt, weights_only=True)
    _equal_bits(_safetensors(run_ckpt / "export"), engine)
    _equal_bits(_safetensors(run_export), engine)
    # every gate_proj element a tie: the export rounds them as the engine does (away from zero)
    engine_ties = torch.load(ties_pt, weights_only=True)
    exported = _safetensors(ties_export)
    _equal_bits(exported, engine_ties)
    masters = read_masters(str(ties_ckpt / "checkpoints"))
    gate = sorted(n for n in masters if n.endswith("mlp.gate_proj"))
    assert gate and bf16_run["ties"] == sum(masters[n].numel() for n in gate) > 0
    counted, nearest_even_differs = 0, 0
    for name in gate:
        master = masters[name]
        assert ((master.view(torch.int32) & 0xFFFF) == 0x8000).all(), name  # each element a tie
        counted += master.numel()
        weight = exported[f"{name}.weight"].float().view(-1)
        assert (weight.abs() > master.abs()).all(), name  # rounded away from zero, every one
        nearest_even_differs += int((master.to(torch.bfloat16).float() != weight).sum())
    assert counted == bf16_run["ties"]
    assert nearest_even_differs > counted // 4, "Tensor.to (ties to even) would have exported other values"
    assert any(not torch.equal(engine[f"{n}.weight"], engine_ties[f"{n}.weight"]) for n in gate)


def test_bf16_eval_only_on_the_export_reproduces_the_last_row_and_predictions(bf16_run) -> None:
    """Two ranks, bf16: --eval-only on gorp's export gives the run's last row of R and every
    prediction line of it, bit for bit (the six-method launch's own settings)."""
    run_dir = bf16_run["run"]
    out = bf16_run["root"] / "eval_bf16"
    proc = bf16_run["eval_proc"]  # launched by the fixture, beside the engine rebuild
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads((run_dir / "gorp" / "results.json").read_text())
    again = json.loads((out / "eval" / "results.json").read_text())
    assert again["R"] == [result["R"][-1]]
    lines = 0
    for j, path in enumerate(result["predictions"][-1]):
        run_text = (run_dir / "gorp" / path).read_text()
        assert (out / "eval" / again["predictions"][0][j]).read_text() == run_text, path
        lines += len(run_text.splitlines())
    assert lines == len(result["tasks"]) * 8  # every line of every task (EVAL_SAMPLES each)
