"""Per-task metrics: pure functions ``(prediction, reference) -> score in [0, 100]``, registered by name.

A task declares its metric (``Task.metric``, a key of :data:`TASK_METRICS`); an entry of R is the mean
of that metric over the task's test examples, so R holds each task's own metric (docs/protocol.md).

- ``accuracy``: 100 if the normalised generation equals the normalised label word, else 0
  (:func:`~gorp_ds.data.tokenize.normalize_answer`: cut at the first newline, lower case, punctuation
  removed, white space collapsed). Needs a label set: the classification metric.
- ``exact_match``: 100 if the whole normalised generation equals the whole normalised reference, else 0
  (:func:`normalize_text`: as ``accuracy`` but not cut at a newline, since free-form answers may span
  lines).
- ``rougeL``: ROUGE-L F-measure × 100 (longest common subsequence of words) by the ``rouge-score``
  library, without stemming. That library is maintained and is the reference implementation whose
  numbers the summarisation literature reports; its tokenisation lower-cases and keeps only runs of
  ``[a-z0-9]``.
- ``edit_sim``: ``difflib.SequenceMatcher(None, prediction, reference, autojunk=False).ratio()`` × 100,
  i.e. ``2·M / (|prediction| + |reference|)`` over characters, where ``M`` is the number of characters
  in the matching blocks Ratcliff/Obershelp pattern matching finds (standard library only); both strings
  stripped of surrounding white space first. Two empty strings score 100.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from .tokenize import normalize_answer  # the classification normalisation, shared with is_correct

__all__ = ["TASK_METRICS", "TaskMetric", "accuracy", "edit_sim", "exact_match", "normalize_text", "rouge_l"]

_SPACES = re.compile(r"\s+")
_ASCII_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    """Lower case, punctuation (ASCII and Unicode) removed, white space (newlines too) collapsed."""
    text = "".join(ch for ch in text.lower()
                   if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    return _SPACES.sub(" ", text).strip()


def accuracy(prediction: str, reference: str) -> float:
    return 100.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize_text(prediction) == normalize_text(reference) else 0.0


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # lazy: imports nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    # rouge-score's score(target, prediction); an empty side gives 0 (its convention).
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def edit_sim(prediction: str, reference: str) -> float:
    return 100.0 * difflib.SequenceMatcher(None, prediction.strip(), reference.strip(), autojunk=False).ratio()


@dataclass(frozen=True)
class TaskMetric:
    """A registered metric: its function and whether it scores against a fixed label set."""

    name: str
    score: Callable[[str, str], float]
    needs_labels: bool = False
    description: str = ""


#: Every metric a task may declare, by name (``task.json``'s ``"metric"``).
TASK_METRICS: dict[str, TaskMetric] = {m.name: m for m in (
    TaskMetric("accuracy", accuracy, needs_labels=True, description="normalised label word matches"),
    TaskMetric("exact_match", exact_match, description="normalised text matches"),
    TaskMetric("rougeL", rouge_l, description="ROUGE-L F-measure (rouge-score)"),
    TaskMetric("edit_sim", edit_sim, description="difflib SequenceMatcher ratio over characters"),
)}
