"""Evaluation's generate() under ZeRO-3 (bench/zero3_generation.py on 2 CPU ranks): with the model
gathered once (``for_generation("gather")``, what evaluation uses when the model fits) decoding issues
no collective at all, whatever the number of tokens; with DeepSpeed's per-module hooks it issues
some for every token. Both give the unpartitioned model's tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.launch import clean_env

pytestmark = pytest.mark.slow


def test_generate_under_zero3_gathers_once_not_per_token(tmp_path):
    tokens = 4
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "zero3_generation.py"), "--ranks", "2",
                           "--decoder", "generate", "--hidden", "32", "--layers", "2", "--heads", "4", "--vocab", "128",
                           "--batch", "2", "--prompt-len", "8", "--new-tokens", str(tokens), "--repeats", "1",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=clean_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = {r["strategy"]: r for r in map(json.loads, (tmp_path / "zero3_generation.jsonl").read_text().splitlines())}
    assert set(rows) == {"gather", "hooks"}
    for r in rows.values():
        assert r["decoder"] == "generate" and r["same_tokens_as_unpartitioned"] and r["new_tokens"] == tokens, r
    assert rows["gather"]["collectives_while_decoding"] == 0
    # the hooks gather each module's parameters at every forward: one forward per new token, 2 layers + head
    assert rows["hooks"]["collectives_while_decoding"] >= 3 * tokens
