"""One 2-rank ZeRO-2 launch of all six methods on the tiny LLaMA, then its outputs: results, R,
metrics recomputed from R, reports, TensorBoard scalars and the shared spaces in the checkpoints;
and what it prints: no warning that tells the user nothing, one set of progress bars.

The launch is made once per test session and also serves as the uninterrupted reference of
``test_cl_resume.py`` (see :func:`tests.support.launch.six_method_run`).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
import torch

from tests.support.launch import (
    EVAL_SAMPLES,
    METHODS,
    STEPS,
    TASKS,
    noise_in,
    read_results,
    read_scalars,
    six_method_output,
    six_method_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return six_method_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def run_output(run_dir, tiny_model_dir) -> str:
    return six_method_output(tiny_model_dir)


def expected_metrics(r: list) -> dict:
    """docs/algorithm.md §7 with 1-based tasks, literally; None where a needed row was not measured."""
    t = len(r) - 1

    def at(i: int, j: int) -> float:
        return r[i][j - 1]

    aa = sum(at(t, j) for j in range(1, t + 1)) / t
    if t < 2 or any(r[i] is None for i in range(1, t)):
        return {"AA": aa, "BWT": None, "FWT": None, "forgetting": None}
    return {
        "AA": aa,
        "BWT": sum(at(t, j) - at(j, j) for j in range(1, t)) / (t - 1),
        "FWT": sum(at(j - 1, j) - at(0, j) for j in range(2, t + 1)) / (t - 1),
        "forgetting": sum(max(at(i, j) for i in range(1, t)) - at(t, j) for j in range(1, t)) / (t - 1),
    }


@pytest.mark.parametrize("method", METHODS)
def test_results_and_r_matrix(run_dir, method) -> None:
    result = read_results(run_dir, method)
    t = len(TASKS)
    assert result["method"] == method and result["tasks"] == TASKS
    assert result["world_size"] == 2
    r = result["R"]
    assert len(r) == t + 1
    for i, row in enumerate(r):
        if method == "mtl" and 1 <= i < t:
            assert row is None, f"mtl trains once: row {i} must be null"
            continue
        assert row is not None and len(row) == t, (i, row)
        for value in row:
            assert 0.0 <= value <= 100.0
            # each accuracy is (correct of EVAL_SAMPLES examples) in percent
            assert abs(value * EVAL_SAMPLES / 100 - round(value * EVAL_SAMPLES / 100)) < 1e-6, value
    expected = expected_metrics(r)
    assert set(result["metrics"]) == set(expected)
    for key, value in expected.items():
        if value is None:
            assert result["metrics"][key] is None, key
        else:
            assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("method", METHODS)
def test_report_files(run_dir, method) -> None:
    folder = run_dir / method
    assert (folder / "R.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "progress.json").is_file()
    assert (folder / "checkpoints" / "latest").is_file()
    markdown = (folder / "results.md").read_text()
    assert method in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| before training") or line.startswith("| task ")]
    assert len(rows) == len(TASKS) + 1
    for task in TASKS:
        assert task in markdown


def test_summary_lists_all_methods(run_dir) -> None:
    summary = (run_dir / "summary.md").read_text()
    table = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]
    for method in METHODS:
        assert method in table, method
    metrics = json.loads((run_dir / "summary.json").read_text())
    assert list(metrics) == METHODS
    for method in METHODS:
        assert metrics[method] == read_results(run_dir, method)["metrics"]


@pytest.mark.parametrize("method", METHODS)
def test_tensorboard_scalars(run_dir, method) -> None:
    scalars = read_scalars(run_dir, method)
    result = read_results(run_dir, method)
    assert "train/loss" in scalars
    # Every method gets the same budget; mtl spends the sequence's total on the mixed tasks.
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, len(TASKS) * STEPS + 1))
    assert all(value == value and value > 0 for _, value in scalars["train/loss"])  # finite cross-entropy
    r_tags = sorted(tag for tag in scalars if tag.startswith("R/"))
    assert len(r_tags) == len(TASKS)
    for j, (tag, task) in enumerate(zip(r_tags, TASKS)):
        assert task in tag
        measured = {i: row[j] for i, row in enumerate(result["R"]) if row is not None}
        assert {step: pytest.approx(value, abs=1e-4) for step, value in scalars[tag]} == measured, tag
    assert "metrics/AA" in scalars
    for key, value in result["metrics"].items():
        if value is not None:
            assert scalars[f"metrics/{key}"][-1][1] == pytest.approx(value, abs=1e-4), key


def _latest_state(run_dir: Path, method: str) -> list[dict]:
    checkpoints = run_dir / method / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    files = sorted(glob.glob(str(checkpoints / tag / "gorp_state" / "rank_*.pt")))
    assert len(files) == 2, files
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files]


def test_gorp_checkpoint_holds_shared_spaces(run_dir, tiny_model_dir) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    # docs/algorithm.md §3: S lives on the long side: lora_A (r × n) input side n; lora_B (m × r) output side m;
    # full gate_proj (m × n = inter × hidden, m ≥ n, right projection) output side m.
    expected_rows = {}
    for i in range(config.num_hidden_layers):
        for proj, out_features in (("q_proj", hidden), ("v_proj", kv)):
            expected_rows[f"model.layers.{i}.self_attn.{proj}.lora_A"] = hidden
            expected_rows[f"model.layers.{i}.self_attn.{proj}.lora_B"] = out_features
        expected_rows[f"model.layers.{i}.mlp.gate_proj"] = inter

    states = _latest_state(run_dir, "gorp")
    shared = {}
    for state in states:
        assert int(state["tasks_completed"]) == len(TASKS)
        for name, basis in state["shared"].items():
            assert name not in shared, f"{name} saved by two ranks"
            shared[name] = basis.double()
    assert set(shared) == set(expected_rows)
    for name, basis in shared.items():
        rows, columns = basis.shape
        assert rows == expected_rows[name], name
        assert 1 <= columns <= rows - 1, name
        assert torch.allclose(basis.T @ basis, torch.eye(columns, dtype=torch.float64), atol=1e-4), name


@pytest.mark.parametrize("method", [m for m in METHODS if m != "gorp"])
def test_other_methods_keep_no_shared_space(run_dir, method) -> None:
    states = _latest_state(run_dir, method)
    assert all(state["shared"] == {} for state in states)
    if method == "galore":
        assert all(int(state["tasks_completed"]) == len(TASKS) for state in states)


@pytest.mark.parametrize("method", METHODS)
def test_per_task_adapters_follow_the_method_registry(run_dir, method) -> None:
    """--export-adapters (default on): a PEFT adapter per trained task for every method whose spec has
    adapters (mtl: its one mixed task), a full delta for those with GORP's roles (the full-rank
    targets), nothing for seq-ft; the prompt record in the final export; no task-start values left."""
    from safetensors.torch import load_file

    from gorp_ds.models.methods import method_spec

    spec = method_spec(method)
    export = run_dir / method / "export"
    trained = 1 if spec.mixed_tasks else len(TASKS)
    folders = sorted(p.name for p in export.glob("task_*"))
    assert folders == ([f"task_{t:02d}" for t in range(1, trained + 1)] if spec.adapters else []), method
    for folder in folders:
        factors = load_file(export / folder / "adapter" / "adapter_model.safetensors")
        assert len(factors) == 8 and any(float(v.abs().max()) > 0 for k, v in factors.items() if ".lora_B." in k)
        assert (export / folder / "full_delta.safetensors").is_file() == spec.gorp_roles
        assert (export / folder / "gorp_ds_prompt.json").is_file()
    record = json.loads((export / "gorp_ds_prompt.json").read_text())
    assert record["method"] == method and [t["name"] for t in record["tasks"]] == TASKS
    assert not (run_dir / method / ".task_start").exists()


def test_olora_penalty_reaches_the_update(run_dir) -> None:
    """o-lora's orthogonality loss is in the gradient the engine steps with (ZeRO-2, two ranks): its
    task-1 adapter is seq-lora's exactly (no earlier A yet: no penalty; same seed, data and init),
    and every later task's A overlaps the earlier tasks' A's, Σ_{i<t} Σ|A_i A_tᵀ| in float64 from the
    exported fp32 masters, far less than seq-lora's (measured on one rank: about half at λ1 0.5)."""
    from safetensors.torch import load_file

    def a_of(method: str, task: int) -> dict[str, torch.Tensor]:
        factors = load_file(run_dir / method / "export" / f"task_{task:02d}" / "adapter" / "adapter_model.safetensors")
        return {k: v.double() for k, v in factors.items() if ".lora_A." in k}

    olora = {t: a_of("o-lora", t) for t in range(1, len(TASKS) + 1)}
    seq = {t: a_of("seq-lora", t) for t in range(1, len(TASKS) + 1)}
    assert all(torch.equal(olora[1][k], seq[1][k]) for k in seq[1])
    for t in range(2, len(TASKS) + 1):
        overlap = {m: sum(float((a[i][k] @ a[t][k].T).abs().sum()) for k in a[t] for i in range(1, t))
                   for m, a in (("o-lora", olora), ("seq-lora", seq))}
        assert overlap["o-lora"] < 0.75 * overlap["seq-lora"], (t, overlap)


def test_olora_logs_the_overlap_at_each_tasks_start_and_end(run_dir, run_output) -> None:
    """From task 2 on, o-lora logs its orthogonality term before the task's first step (a fresh A:
    the draw seeded by (seed, task, layer), re-derived here) and at its end; both equal the float64
    overlap with the earlier tasks' exported A's (the log's 4 digits, the run's bf16 A's), and the
    end is below the start. No other method and no first task logs one."""
    import math
    import zlib

    from safetensors.torch import load_file

    pattern = re.compile(r"\[(?P<method>[\w-]+)\] task (?P<task>\d+): orthogonality Σ\|A_old A_newᵀ\| "
                         r"(?P<start>[\d.e+-]+) at step 0, (?P<end>[\d.e+-]+) at the end \(λ1 0\.5\)")
    logged = {(m["method"], int(m["task"])): (float(m["start"]), float(m["end"])) for m in pattern.finditer(run_output)}
    assert sorted(logged) == [("o-lora", t) for t in range(2, len(TASKS) + 1)], sorted(logged)

    def a_of(task: int) -> dict[str, torch.Tensor]:
        factors = load_file(run_dir / "o-lora" / "export" / f"task_{task:02d}" / "adapter" / "adapter_model.safetensors")
        return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.double()
                for k, v in factors.items() if ".lora_A." in k}

    trained = {t: a_of(t) for t in range(1, len(TASKS) + 1)}
    for t in range(2, len(TASKS) + 1):
        start = end = 0.0
        for name, a in trained[t].items():
            bound = 1 / math.sqrt(a.shape[1])  # PEFT's kaiming-uniform A: U(−1/√n, 1/√n), seeded per (seed 0, task, layer)
            generator = torch.Generator().manual_seed(zlib.crc32(f"0/{t - 1}/{name}".encode()))
            fresh = torch.empty(a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator).double()
            old = torch.cat([trained[i][name] for i in range(1, t)])  # (t−1)·r × n
            start += float((old @ fresh.T).abs().sum())
            end += float((old @ a.T).abs().sum())
        assert logged[("o-lora", t)] == pytest.approx((start, end), rel=1e-2), (t, logged[("o-lora", t)], start, end)
        assert logged[("o-lora", t)][1] < logged[("o-lora", t)][0]


def test_launch_prints_no_noise(run_output) -> None:
    assert noise_in(run_output) == []


def _bar_starts(output: str, desc: str) -> int:
    """How many progress bars described ``desc`` were started (tqdm's first render: nothing done,
    no time elapsed, no rate yet, no postfix)."""
    return len(re.findall(re.escape(desc) + r"[^\r\n|]*:\s+0%\|[^|]*\| 0/\d+ \[00:00<\?, \?\w+/s\]", output))


def test_one_rank_draws_the_progress_bars(run_output) -> None:
    # Both ranks load the model once per method: transformers' bars on one of them only.
    assert _bar_starts(run_output, "Loading weights") == len(METHODS)
    for method in METHODS:
        assert _bar_starts(run_output, f"[{method}] task 1/") == 1, method
        assert _bar_starts(run_output, f"[{method}] export") == 1, method
