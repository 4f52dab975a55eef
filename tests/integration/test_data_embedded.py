"""Embedded suite: deterministic, balanced, train/test disjoint, interfering, within the token budget;
its free-form task (emb_reverse) asks for the input's words reversed and is scored by ROUGE-L."""

from __future__ import annotations

from collections import Counter

import pytest

from gorp_ds.data import EMBEDDED_DEFAULT, DataConfig, DataError, load_task_sequence
from gorp_ds.data.embedded import CATEGORIES, CODES, EMBEDDED_TASKS, FILLERS, REVERSE_TASK, embedded_task


@pytest.fixture(scope="module")
def default_suite():
    return load_task_sequence(DataConfig())


@pytest.fixture(scope="module")
def suite(default_suite):
    """The classification tasks of the default sequence."""
    return [t for t in default_suite if t.kind == "classification"]


def test_default_sequence(default_suite, suite) -> None:
    assert [t.name for t in default_suite] == list(EMBEDDED_DEFAULT) == [f"emb_{c}" for c in CATEGORIES] + [REVERSE_TASK]
    # make run's order: the classification tasks, then the free-form one
    assert list(EMBEDDED_DEFAULT) == list(EMBEDDED_TASKS)
    assert [t.kind for t in default_suite] == ["classification"] * len(CATEGORIES) + ["instruction"]
    assert [t.name for t in suite] == [f"emb_{c}" for c in CATEGORIES]
    assert load_task_sequence(DataConfig(tasks=[REVERSE_TASK]))[0].kind == "instruction"
    assert all(len(t.train) == 2000 and len(t.test) == 200 for t in default_suite)
    assert len({t.instruction for t in suite}) == len(suite)  # tasks are distinguishable
    assert all(t.labels == CODES for t in suite)  # one shared label vocabulary
    custom = load_task_sequence(DataConfig(tasks=["emb_object", "emb_color"], max_train_per_task=100))
    assert [t.name for t in custom] == ["emb_object", "emb_color"] and len(custom[0].train) == 100


def test_deterministic(default_suite, suite) -> None:
    again = load_task_sequence(DataConfig(seed=5))  # the run seed does not change the suite
    for a, b in zip(default_suite, again, strict=True):
        assert (a.train, a.test, a.instruction, a.labels) == (b.train, b.test, b.instruction, b.labels)
    other = embedded_task(EMBEDDED_DEFAULT[0], seed=99)
    assert other.train != suite[0].train


def test_balanced_and_disjoint(suite) -> None:
    for t in suite:
        for split in (t.train, t.test):
            counts = Counter(e.label for e in split)
            assert set(counts) == set(CODES) and len(set(counts.values())) == 1
        train_inputs = {e.text for e in t.train}
        assert len(train_inputs) == len(t.train)
        assert not train_inputs & {e.text for e in t.test}


def test_own_key_words_in_shared_context(suite) -> None:
    """Each input holds exactly one key word of its task's category among shared filler words, and
    the label is a balanced function of that key word (4 words onto 4 codes)."""
    for t, category in zip(suite, CATEGORIES, strict=True):
        rule = {}
        for e in t.train + t.test:
            words = e.text.split()
            keys = [w for w in words if w in CATEGORIES[category]]
            assert len(keys) == 1 and len(words) == 4
            assert set(words) - set(keys) <= set(FILLERS)
            assert rule.setdefault(keys[0], e.label) == e.label
        assert sorted(rule.values()) == sorted(CODES)
    # The tasks share the context (fillers) and the answers (codes), not the key words.
    contexts = [{w for e in t.train for w in e.text.split() if w in FILLERS} for t in suite]
    assert all(c == set(FILLERS) for c in contexts)


def test_reverse_task() -> None:
    task = load_task_sequence(DataConfig(tasks=[REVERSE_TASK]))[0]
    assert (task.kind, task.metric, task.labels, task.max_new_tokens) == ("instruction", "rougeL", (), 16)
    vocabulary = {w for words in CATEGORIES.values() for w in words}
    for e in task.train + task.test:
        words = e.text.split()
        assert len(words) == len(set(words)) == 4 and set(words) <= vocabulary
        assert e.label.split() == words[::-1]
    assert not {e.text for e in task.train} & {e.text for e in task.test}
    assert len({e.text for e in task.train}) == len(task.train)
    assert task.prompt(task.test[0]) == f"Reverse the words.\nInput: {task.test[0].text}\nAnswer:"
    assert embedded_task(REVERSE_TASK).test == task.test  # deterministic


def test_bad_sizes() -> None:
    with pytest.raises(DataError, match="distinct inputs"):
        embedded_task("emb_color", n_train=20_000)
    with pytest.raises(DataError, match="available: emb_color"):
        embedded_task("emb_nope")


def _smollm2_tokenizer():
    from gorp_ds.models import embedded_file

    path = embedded_file.find()
    if path is None:
        pytest.skip("the embedded model's file is not installed (python -m gorp_ds.models.embedded_file)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_token_budget_with_smollm2(suite) -> None:
    from gorp_ds.data import encode_for_training

    tok = _smollm2_tokenizer()
    for t in suite:
        lengths = [
            len(encode_for_training(tok, t, e, 256)["input_ids"]) for e in t.train[:300] + t.test[:100]
        ]
        assert max(lengths) <= 24, (t.name, max(lengths))
        # every code is one token, so the supervised part is exactly code + EOS
        ex = t.test[0]
        enc = encode_for_training(tok, t, ex, 256)
        supervised = [x for x in enc["labels"] if x != -100]
        assert len(supervised) == 2
        assert tok.decode(supervised) == t.target(ex) + tok.eos_token
        n_prompt = len(enc["labels"]) - 2
        assert tok.decode(enc["input_ids"][:n_prompt]) == t.prompt(ex)
