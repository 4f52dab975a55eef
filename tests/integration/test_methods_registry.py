"""Methods are data: a registry of specs that the runner asks, never a method's name compared.
A new method is one registry entry, shown end to end with a test-only method."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gorp_ds.models import METHODS, MethodSpec, build_param_groups, method_spec
from tests.support import REPO
from tests.support.launch import clean_env

NAMES = "|".join(re.escape(name) for name in ("gorp", "galore", "seq-lora", "o-lora", "mtl", "seq-ft"))
# `method == "gorp"`, `spec.name in ("mtl", ...)`, `"o-lora" in cfg.methods`, `method != 'seq-ft'` ...
COMPARISON = re.compile(rf"""(method\w*|\.name)\s*(==|!=|\bnot in\b|\bin\b)\s*[(\[{{]?\s*["']({NAMES})["']"""
                        rf"""|["']({NAMES})["']\s*(==|!=|\bnot in\b|\bin\b)""")


def test_no_method_name_is_compared_outside_the_registry() -> None:
    hits = []
    for path in sorted((REPO / "gorp_ds").rglob("*.py")):
        if path.name == "methods.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COMPARISON.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_pattern_finds_the_comparisons_it_forbids() -> None:
    for line in ('if method == "gorp":', "if self.method != 'o-lora':", 'x = a if method in ("mtl", "x") else b',
                 'if "o-lora" in cfg.methods:', 'if spec.name == "seq-ft":'):
        assert COMPARISON.search(line), line
    assert not COMPARISON.search('register(MethodSpec(name="gorp", summary="..."))')


def test_the_registry_holds_the_six_methods_with_their_table() -> None:
    assert list(METHODS) == ["gorp", "galore", "seq-lora", "o-lora", "mtl", "seq-ft"]
    gorp, galore = method_spec("gorp"), method_spec("galore")
    # galore is GORP without the shared space: every other answer is the same.
    assert (gorp.gorp_roles, galore.gorp_roles, gorp.shared_space, galore.shared_space) == (True, True, True, False)
    assert [m.name for m in METHODS.values() if not m.adapters] == ["seq-ft"]
    assert [m.name for m in METHODS.values() if m.mixed_tasks] == ["mtl"]
    assert [m.name for m in METHODS.values() if m.penalty is not None] == ["o-lora"]
    assert [m.name for m in METHODS.values() if m.zero3_refusal] == ["o-lora"]
    with pytest.raises(ValueError, match="unknown method 'sgd'; choose from gorp, galore"):
        method_spec("sgd")


@pytest.mark.parametrize("bad", [dict(adapters=False, gorp_roles=True), dict(shared_space=True),
                                 dict(adapters=True, train_all_weights=True)])
def test_a_spec_that_contradicts_itself_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="method x"):
        MethodSpec(name="x", summary="", **bad)


def test_groups_follow_the_spec_not_the_name(tiny_model_dir: Path) -> None:
    """An unregistered spec with gorp's answers gives gorp's groups (roles, S threshold)."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from gorp_ds.models import LoraSettings, TargetsConfig, add_lora
    from gorp_ds.optim.config import OptimizerConfig

    def groups(method):
        model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=2))
        built = build_param_groups(model, method, TargetsConfig(), OptimizerConfig(shared_threshold=0.7))
        return [(g["role"], g["names"], g.get("shared_threshold")) for g in built]

    twin = dataclasses.replace(method_spec("gorp"), name="twin")
    assert groups(twin) == groups("gorp")
    assert [role for role, _, _ in groups(twin)] == ["lora_a", "lora_b", "full"]
    unprotected = dataclasses.replace(twin, shared_space=False, lora_init_off_shared=False)
    assert {t for _, _, t in groups(unprotected)} == {0.0} and {t for _, _, t in groups(twin)} == {0.7}


REGISTER_AND_TRAIN = r'''
import sys
from gorp_ds.models.methods import MethodSpec, register
# The whole addition: one registry entry (GORP's roles without S, LoRA A not re-initialised off S).
register(MethodSpec(name="probe-galore", summary="test-only: gorp's roles without the shared space",
                    gorp_roles=True))
from gorp_ds.cli import train
sys.exit(train(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_new_method_is_one_registry_entry(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", REGISTER_AND_TRAIN, "--model", str(tiny_model_dir), "--method", "probe-galore,galore",
         "--tasks", "emb_color,emb_animal", "--max-steps-per-task", "2", "--eval-samples", "4",
         "--global-batch-size", "4", "--micro-batch-size", "2", "--export", "false", "--checkpoints", "false",
         "--output-dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probe = json.loads((out / "probe-galore" / "results.json").read_text())
    galore = json.loads((out / "galore" / "results.json").read_text())
    assert probe["method"] == "probe-galore" and len(probe["R"]) == 3
    # The same answers as galore's spec (it differs only in its name): the same trajectory, so the same R.
    assert probe["R"] == galore["R"]
    log = proc.stdout + proc.stderr
    assert "[probe-galore] trainable: lora_a" in log and ", full " in log
