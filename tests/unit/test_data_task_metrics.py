"""The per-task metrics (gorp_ds/data/metrics.py) against values computed by hand."""

from __future__ import annotations

import random

import pytest

from gorp_ds.data.metrics import TASK_METRICS, accuracy, edit_sim, exact_match, normalize_text, rouge_l


def test_registry() -> None:
    assert set(TASK_METRICS) == {"accuracy", "exact_match", "rougeL", "edit_sim"}
    assert [n for n, m in TASK_METRICS.items() if m.needs_labels] == ["accuracy"]
    assert all(m.name == n for n, m in TASK_METRICS.items())


def test_accuracy_and_exact_match() -> None:
    assert accuracy(" Vex.", "vex") == 100.0 and accuracy("nar", "vex") == 0.0
    # accuracy reads the first line only; exact match the whole text (free-form answers span lines)
    assert accuracy("The  answer.\nsecond", "the answer") == 100.0
    assert exact_match("The  answer.\nsecond", "the answer") == 0.0
    assert exact_match("The  answer.\nsecond", "the answer second") == 100.0
    assert normalize_text(" Hello,\tWorld! «x» ") == "hello world x"
    assert exact_match("", "") == 100.0 and exact_match("a", "") == 0.0


def test_rouge_l_by_hand() -> None:
    # tokens [the, cat, sat] vs [cat, the, sat, on]: LCS 2, P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("the cat sat", "cat the sat on") == pytest.approx(100 * 4 / 7, abs=1e-12)
    # lower case, punctuation split off (rouge-score's tokenisation)
    assert rouge_l("Dog, CAT!", "dog cat") == pytest.approx(100.0)
    # the reversed order of 4 words shares one word in order: P = R = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(25.0)
    assert rouge_l("", "x") == 0.0 and rouge_l("x y", "z") == 0.0


def test_edit_sim_by_hand() -> None:
    assert edit_sim("abcd", "abce") == pytest.approx(100 * 2 * 3 / 8)
    # matching blocks "itt" and "n": M = 4, 2M / (6 + 7)
    assert edit_sim("kitten", "sitting") == pytest.approx(100 * 8 / 13)
    assert edit_sim(" ab ", "ab") == 100.0 and edit_sim("", "") == 100.0 and edit_sim("abc", "") == 0.0


def test_every_metric_is_in_0_100() -> None:
    rng = random.Random(0)
    alphabet = "ab c.\nD"
    for _ in range(300):
        a, b = ("".join(rng.choice(alphabet) for _ in range(rng.randrange(8))) for _ in range(2))
        for metric in TASK_METRICS.values():
            assert 0.0 <= metric.score(a, b) <= 100.0
            assert metric.score(b, b) == 100.0 or not normalize_text(b)
