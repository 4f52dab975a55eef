"""bench/eval_throughput.py: its smoke run (CPU, seconds, deepspeed not importable) reports both
decoders with the same tokens and full-length generations; the tokens it times are those of
transformers' plain generate(); its models are built in the asked dtype, seeded; its table's ratios."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch

from tests.support import REPO
from tests.support.torch_only import run_torch_only

sys.path.insert(0, str(REPO))

from bench.eval_throughput import SHAPES, build_random, make_batch, measure, table  # noqa: E402

pytestmark = pytest.mark.slow



def test_smoke_run_reports_both_decoders(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = ["--smoke", "--shapes", "smoke,model", "--model", str(tiny_model_dir), "--out", str(out)]
    proc = run_torch_only("eval_throughput", args, tmp_path)  # the benchmark needs only torch and transformers
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    noise = [line for line in proc.stderr.splitlines() if "warn" in line.lower() or "[transformers]" in line]
    assert noise == []
    rows = [json.loads(line) for line in (out / "eval_throughput.jsonl").read_text().splitlines()]
    assert [(r["shape"], r["batch"], r["decoder"]) for r in rows] == [
        (shape, batch, decoder) for shape in ("smoke", "model") for batch in (1, 3) for decoder in ("generate", "loop")]
    for r in rows:
        assert r["full_length"] and r["same_rows"] == r["batch"], r  # both decoders, the same tokens, all 4 of them
        assert r["new_tokens"] == 4 and len(r["seconds"]) == 2 and r["dtype"] == "fp32" and r["device"]
        assert r["seconds_median"] == pytest.approx(statistics.median(r["seconds"]), abs=1e-5)
        # seconds are recorded to 5 decimals, rates to 2: on a fast call that rounding alone is ~1e-3
        rounding = 1e-5 / r["seconds_median"]
        assert r["generations_per_s"] == pytest.approx(r["batch"] / r["seconds_median"], rel=1e-3 + rounding, abs=0.01)
        assert r["new_tokens_per_s"] == pytest.approx(4 * r["batch"] / r["seconds_median"], rel=1e-3 + rounding, abs=0.1)
        assert 6 <= r["padded_width"] <= 20
    assert rows[0]["weights"] == "random init (seed 0)" and str(tiny_model_dir) in rows[-1]["weights"]
    report = (out / "eval_throughput.md").read_text()
    for shape in ("smoke", "model"):
        for decoder in ("generate", "loop"):
            assert sum(line.startswith(f"| {shape} | ") and f"| {decoder} |" in line for line in report.splitlines()) == 2
    assert report == proc.stdout[proc.stdout.index("# Evaluation throughput"):]  # printed at the end too


def test_the_timed_tokens_are_those_of_plain_generate():
    shape = SHAPES["smoke"]
    model = build_random(shape, torch.float32, torch.device("cpu"), seed=0)
    ids, mask = make_batch(3, (6, 20), shape["vocab"], 0, seed=5, device=torch.device("cpu"))
    lengths = mask.sum(1)
    assert mask.shape == ids.shape and int(lengths.max()) == ids.shape[1] and int(lengths.min()) >= 6
    assert (mask.cumsum(1)[:, -1] == lengths).all() and (ids[mask == 0] == 0).all()  # left-padded with 0
    never = shape["vocab"]
    times, tokens = measure(model, ["generate", "loop"], ids, mask, 5, never, warmup=0, repeats=1,
                            device=torch.device("cpu"))
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               eos_token_id=never, pad_token_id=0)[:, ids.shape[1]:]
    assert reference.shape == (3, 5)
    for name in ("generate", "loop"):
        assert torch.equal(tokens[name], reference), name
        assert len(times[name]) == 1 and times[name][0] > 0


def test_random_models_are_built_in_their_dtype_and_seeded():
    shape = {**SHAPES["smoke"], "tied": True}
    a = build_random(shape, torch.bfloat16, torch.device("cpu"), seed=3)
    b = build_random(shape, torch.bfloat16, torch.device("cpu"), seed=3)
    c = build_random(shape, torch.bfloat16, torch.device("cpu"), seed=4)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied, as SmolLM2's
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    weight = a.model.layers[0].mlp.gate_proj.weight.detach().float()
    assert abs(float(weight.mean())) < 2e-3 and float(weight.std()) == pytest.approx(0.02, rel=0.1)
    assert (a.model.norm.weight == 1).all()
    assert SHAPES["135m"]["hidden"] == 576 and SHAPES["7b"]["intermediate"] == 11008


def test_the_table_gives_each_decoder_its_ratio_to_the_loop():
    base = {"shape": "7b", "batch": 8, "prompt_tokens": "128-256", "padded_width": 250, "same_rows": 8,
            "peak_gib": 14.0}
    records = [{**base, "decoder": "generate", "seconds_median": 0.5, "generations_per_s": 16.0, "new_tokens_per_s": 256.0},
               {**base, "decoder": "loop", "seconds_median": 1.0, "generations_per_s": 8.0, "new_tokens_per_s": 128.0},
               {**base, "batch": 64, "decoder": "generate", "error": "out of memory"}]
    lines = table(records, ["# t"]).splitlines()
    assert lines[0] == "# t"
    assert "| 7b | 8 | 128-256 (padded 250) | generate | 0.5000 | 16.00 | 256 | 2.00 | 8/8 | 14.0 |" in lines
    assert "| 7b | 8 | 128-256 (padded 250) | loop | 1.0000 | 8.00 | 128 | 1.00 | 8/8 | 14.0 |" in lines
    assert any(line.startswith("| 7b | 64 |") and "out of memory" in line for line in lines)
