"""Data pipeline: a built-in tokenizer, JSONL datasets -> ``Example``s, eval splits, a resumable
batch cursor, and the bundled synthetic tasks."""

from .datasets import (
    DataCursor,
    DatasetError,
    build_examples,
    completion_exact_match,
    detect_format,
    load_examples,
    prompt_and_target,
    read_jsonl,
    rows_format,
    split_eval,
    tokenize_row,
)

__all__ = [
    "DataCursor",
    "DatasetError",
    "build_examples",
    "completion_exact_match",
    "detect_format",
    "load_examples",
    "prompt_and_target",
    "read_jsonl",
    "rows_format",
    "split_eval",
    "tokenize_row",
    "TASKS",
    "generate_task",
    "build_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]


def __getattr__(name):  # the tokenizer module imports transformers: load it on first use
    if name in ("build_tokenizer", "save_tokenizer", "load_tokenizer"):
        from . import tokenizer

        return getattr(tokenizer, name)
    if name in ("TASKS", "generate_task"):  # lazy so `python -m lorafleet.data.tasks` runs cleanly
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
