"""The embedded task suite: four generated "code the X word" classification tasks and one generated
instruction task with a free-form answer ("reverse the words", scored by ROUGE-L), none needing files.

Design (what makes the suite useful as a small continual-learning benchmark):

* **Own key words, shared context.** An input is one word of the task's category (colour,
  animal, fruit or object) among three filler words shared by all tasks, in random order, e.g.
  ``"old dog the big"`` for ``emb_animal``. Tasks therefore rely on different input features
  (their key words) inside a common context, like the domains of a real task sequence.
* **One label vocabulary.** Every task answers with the same four arbitrary code words
  (:data:`CODES`: ``vex nar lux zig``), each a single token for the SmolLM2/GPT-2 style BPE
  tokenizers. Each task's word-to-code mapping is random (seeded) and never stated, so no model
  can solve a task zero-shot (accuracy ~0, the model does not even produce code words).
* **Interference through the shared answer mechanism.** Every task pushes the same answer
  position towards the same four code tokens, so unconstrained sequential fine-tuning of one
  adapter overwrites how earlier key words map to codes: ``seq-lora`` forgets (measured on
  SmolLM2-135M, 40 steps per task: task 1 falls from 100 % to ~55 % after three more tasks), while
  a method that keeps new updates out of the directions earlier tasks used can keep them
  (``gorp`` stays at ~90 %).
* **Short and learnable.** A whole example (prompt + answer + EOS) is ~16 tokens, and the rule is
  a lexical look-up that LoRA (r=8 on q, v) learns in ~30–40 steps of batch 16 at lr 1e-3.
* **A free-form task last.** ``emb_reverse`` (:data:`REVERSE_TASK`) asks for the input's words
  (:data:`REVERSE_WORDS` distinct key words of every category) in reverse order; its answer is
  scored by ROUGE-L (word LCS), so copying the input scores 25 and only the reversal scores 100.
* **Balanced and clean.** Labels are exactly balanced in each split (sizes divisible by 4; otherwise
  the first labels get one example more), test inputs never occur in the same task's train split,
  and everything is a pure function of the seed.
"""

from __future__ import annotations

import random

from .errors import DataError
from .tasks import Example, Task

__all__ = [
    "CATEGORIES",
    "CODES",
    "FILLERS",
    "EMBEDDED_CLASSIFICATION",
    "EMBEDDED_DEFAULT",
    "EMBEDDED_SEED",
    "EMBEDDED_TASKS",
    "REVERSE_TASK",
    "embedded_task",
]

#: Label words shared by all embedded tasks (arbitrary codes; single tokens for SmolLM2).
CODES: tuple[str, ...] = ("vex", "nar", "lux", "zig")

#: Word lists per category; each task maps the words of its category onto :data:`CODES`.
#: Lengths are multiples of len(CODES) so every code owns the same number of words.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black"),
    "animal": ("cat", "dog", "horse", "bird"),
    "fruit": ("apple", "lemon", "grape", "pear"),
    "object": ("cup", "hat", "box", "pen"),
}

#: The generated instruction task (free-form answer, ROUGE-L) and its input length in words.
REVERSE_TASK = "emb_reverse"
REVERSE_WORDS = 4
REVERSE_NEW_TOKENS = 16  # four words and EOS, with room for a tokenizer that splits words

#: The classification tasks ("code the X word"), one per category.
EMBEDDED_CLASSIFICATION: tuple[str, ...] = tuple(f"emb_{c}" for c in CATEGORIES)

#: Every embedded task: the classification tasks, then the instruction task.
EMBEDDED_TASKS: tuple[str, ...] = (*EMBEDDED_CLASSIFICATION, REVERSE_TASK)

#: The default training order (``make run``): the classification tasks, then the instruction task,
#: so that the default run trains and scores both kinds of answer (accuracy and ROUGE-L in one R).
EMBEDDED_DEFAULT: tuple[str, ...] = EMBEDDED_TASKS

#: Seed the suite is generated from (fixed, so the embedded benchmark is the same in every run;
#: the run seed only drives sub-sampling and batch order).
EMBEDDED_SEED = 1234

DEFAULT_TRAIN = 2000
DEFAULT_TEST = 200


def _instruction(category: str) -> str:
    return f"Code the {category}."


def _code_map(category: str, seed: int) -> dict[str, str]:
    """Random, balanced map word -> code for one category (each code owns the same number of words)."""
    words = list(CATEGORIES[category])
    rng = random.Random(f"embedded-map:{seed}:{category}")
    rng.shuffle(words)
    return {w: CODES[i % len(CODES)] for i, w in enumerate(words)}


def _label_sequence(n: int, rng: random.Random) -> list[str]:
    labels = [CODES[i % len(CODES)] for i in range(n)]
    rng.shuffle(labels)
    return labels


#: Context words shared by every task's inputs (never key words of any category).
FILLERS: tuple[str, ...] = ("the", "and", "very", "some", "two", "big", "old", "new", "this", "that", "one", "my")
FILLERS_PER_INPUT = 3


def _draw_input(category: str, word: str, rng: random.Random) -> str:
    words = [word] + [rng.choice(FILLERS) for _ in range(FILLERS_PER_INPUT)]
    rng.shuffle(words)
    return " ".join(words)


def _input_space_size() -> int:
    """Distinct inputs per task: key word × filler sequence × key position."""
    return len(next(iter(CATEGORIES.values()))) * len(FILLERS) ** FILLERS_PER_INPUT * (FILLERS_PER_INPUT + 1)


def embedded_task(
    name: str, seed: int = EMBEDDED_SEED, n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST
) -> Task:
    """Generate embedded task ``name`` (one of :data:`EMBEDDED_TASKS`) deterministically from ``seed``."""
    if name == REVERSE_TASK:
        return _reverse_task(seed, n_train, n_test)
    if name not in EMBEDDED_TASKS:
        raise DataError(f"unknown embedded task {name!r}; available: {', '.join(EMBEDDED_TASKS)}")
    if n_train < 1 or n_test < 1:
        raise DataError(f"embedded task {name}: n_train and n_test must be >= 1 (got {n_train}, {n_test})")
    per_task_space = _input_space_size()
    if n_train + n_test > per_task_space // 2:
        raise DataError(
            f"embedded task {name}: {n_train}+{n_test} examples requested but only {per_task_space} "
            f"distinct inputs exist; ask for at most {per_task_space // 2} in total"
        )
    category = name[len("emb_") :]
    code_map = _code_map(category, seed)
    words_for = {code: [w for w, c in code_map.items() if c == code] for code in CODES}
    rng = random.Random(f"embedded-data:{seed}:{name}")
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for n in (n_train, n_test):
        examples = []
        for label in _label_sequence(n, rng):
            while True:  # rejection keeps inputs unique within the task (train/test disjoint)
                text = _draw_input(category, rng.choice(words_for[label]), rng)
                if text not in seen:
                    break
            seen.add(text)
            examples.append(Example(text=text, label=label))
        splits.append(examples)
    return Task(
        name=name,
        labels=CODES,
        instruction=_instruction(category),
        train=splits[0],
        test=splits[1],
    )


def _reverse_task(seed: int, n_train: int, n_test: int) -> Task:
    """``emb_reverse``: the input is REVERSE_WORDS distinct key words, the answer the same words in
    reverse order (instruction kind, ROUGE-L); test inputs never occur in the train split."""
    vocabulary = sorted(w for words in CATEGORIES.values() for w in words)
    space = 1
    for k in range(REVERSE_WORDS):
        space *= len(vocabulary) - k
    if n_train < 1 or n_test < 1 or n_train + n_test > space // 2:
        raise DataError(f"embedded task {REVERSE_TASK}: {n_train}+{n_test} examples requested; give each >= 1 and "
                        f"at most {space // 2} in total")
    rng = random.Random(f"embedded-data:{seed}:{REVERSE_TASK}")
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for n in (n_train, n_test):
        examples = []
        while len(examples) < n:
            words = rng.sample(vocabulary, REVERSE_WORDS)
            text = " ".join(words)
            if text not in seen:
                seen.add(text)
                examples.append(Example(text=text, label=" ".join(reversed(words))))
        splits.append(examples)
    return Task(name=REVERSE_TASK, labels=(), instruction="Reverse the words.", train=splits[0], test=splits[1],
                kind="instruction", metric="rougeL", max_new_tokens=REVERSE_NEW_TOKENS)
