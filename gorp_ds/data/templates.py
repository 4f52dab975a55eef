"""Our instruction templates for the CL_Benchmark tasks (and a generic one for unknown tasks).

Each instruction states the task and lists the label words exactly as they appear in the task's
``labels.json`` (the answer must be one of them), so a capable model can answer zero-shot.
"""

from __future__ import annotations

__all__ = ["instruction_for"]

# Keys are normalised task names (see _key); values take the formatted options list.
_TEMPLATES: dict[str, str] = {
    "agnews": "What is the topic of this news article? Answer with one of: {options}.",
    "dbpedia": "Which category does this encyclopedia entry belong to? Answer with one of: {options}.",
    "amazon": "How does the customer rate the product in this review? Answer with one of: {options}.",
    "yelp": "How does the customer rate the business in this review? Answer with one of: {options}.",
    "sst2": "Is the sentiment of this sentence good or bad? Answer with one of: {options}.",
    "imdb": "Is this movie review good or bad? Answer with one of: {options}.",
}
_GENERIC = "Classify the input ({name}). Answer with one of: {options}."


def _key(name: str) -> str:
    """'SST-2' -> 'sst2', 'TC/dbpedia' -> 'dbpedia', 'ag_news' -> 'agnews'."""
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base.lower() if ch.isalnum())


def instruction_for(name: str, labels: tuple[str, ...] | list[str]) -> str:
    """The instruction for task ``name`` with options ``labels`` (generic template if unknown)."""
    options = ", ".join(labels)
    template = _TEMPLATES.get(_key(name))
    if template is None:
        return _GENERIC.format(name=name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1], options=options)
    return template.format(options=options)
