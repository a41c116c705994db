"""JSONL datasets -> ``Example`` rows, eval splits and a resumable batch cursor.

Three row formats (one per file; extra keys are allowed and kept in ``Example.meta``):

* ``{"text": str}`` -> ``<bos> text <eos>``, loss on every token after ``<bos>``.
* ``{"prompt": str, "completion": str}`` -> ``<bos> prompt completion <eos>``, loss only on the
  completion and ``<eos>``.
* ``{"messages": [{"role": str, "content": str}, ...]}`` -> the tokenizer's chat template, loss
  only on the assistant turns' content and their end marker.

(``<bos>`` / ``<eos>`` are left out where the tokenizer has none.)  ``max_length`` counts tokens of
the whole sequence; the ``Example`` built from it has ``max_length - 1`` positions (Tinker
convention, see ``lorafleet.types.Example``).

Every input problem raises ``DatasetError`` (a ``ValueError``) naming the file and 1-based line.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Iterable, Literal

from ..types import Example

__all__ = [
    "DatasetError",
    "FORMATS",
    "JsonlRow",
    "read_jsonl",
    "detect_format",
    "rows_format",
    "tokenize_row",
    "prompt_and_target",
    "build_examples",
    "load_examples",
    "split_eval",
    "DataCursor",
    "completion_exact_match",
]

Format = Literal["text", "prompt_completion", "messages"]
FORMATS: tuple[str, ...] = ("text", "prompt_completion", "messages")
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}


class DatasetError(ValueError):
    """Bad dataset input (missing file, malformed JSONL, wrong fields, mixed formats, ...)."""


class JsonlRow(dict):
    """A row read by ``read_jsonl``: a plain ``dict`` that also remembers ``source`` (the file)
    and ``line`` (1-based), so later errors and ``Example.meta`` can point at it."""

    __slots__ = ("source", "line")

    def __init__(self, data: dict, source: str | None = None, line: int | None = None):
        super().__init__(data)
        self.source = source
        self.line = line

    @property
    def where(self) -> str | None:
        if self.source is None:
            return None
        return f"{self.source}:{self.line}" if self.line is not None else self.source


def _where(row: Any, index: int | None = None) -> str:
    w = getattr(row, "where", None)
    if w:
        return w
    return f"row {index}" if index is not None else "row"


# ----------------------------------------------------------------------------- formats
def detect_format(row: dict) -> Format:
    """The format of one row: ``"text"``, ``"prompt_completion"`` or ``"messages"``; also checks
    the fields' types.  Raises ``DatasetError`` (without a location; ``read_jsonl`` adds it)."""
    if not isinstance(row, dict):
        raise DatasetError(f"expected a JSON object, got {type(row).__name__}")
    found = [f for f, keys in _FORMAT_KEYS.items() if any(k in row for k in keys)]
    if not found:
        raise DatasetError(
            'no dataset fields: expected "text", "prompt" + "completion", or "messages" '
            f"(keys: {sorted(row)})"
        )
    if len(found) > 1:
        keys = sorted(k for f in found for k in _FORMAT_KEYS[f] if k in row)
        raise DatasetError(f"ambiguous row: has fields of several formats {keys}")
    fmt = found[0]
    if fmt == "text":
        _check_str(row, "text")
    elif fmt == "prompt_completion":
        for k in ("prompt", "completion"):
            if k not in row:
                other = "completion" if k == "prompt" else "prompt"
                raise DatasetError(f'row has "{other}" but no "{k}"')
            _check_str(row, k)
    else:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError('"messages" must be a non-empty list of {"role", "content"} objects')
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DatasetError(f"messages[{j}] must be an object, got {type(m).__name__}")
            for k in ("role", "content"):
                if k not in m:
                    raise DatasetError(f'messages[{j}] has no "{k}"')
                if not isinstance(m[k], str):
                    raise DatasetError(f'messages[{j}]["{k}"] must be a string, got {type(m[k]).__name__}')
    return fmt  # type: ignore[return-value]


def _check_str(row: dict, key: str) -> None:
    if not isinstance(row[key], str):
        raise DatasetError(f'"{key}" must be a string, got {type(row[key]).__name__}')


def rows_format(rows: list[dict]) -> Format:
    """The one format shared by ``rows`` (``DatasetError`` naming the first row that differs)."""
    if not rows:
        raise DatasetError("no rows")
    fmt = None
    for i, row in enumerate(rows):
        try:
            f = detect_format(row)
        except DatasetError as e:
            raise DatasetError(f"{_where(row, i)}: {e}") from None
        if fmt is None:
            fmt = f
        elif f != fmt:
            raise DatasetError(
                f"{_where(row, i)}: row is in {f!r} format but earlier rows are {fmt!r}; "
                "one file must use one format"
            )
    return fmt  # type: ignore[return-value]


def read_jsonl(path: str | Path, check_format: bool = True) -> list[dict]:
    """Read and validate a JSONL dataset: one JSON object per line, blank lines skipped, all rows
    in one format.  Returns ``JsonlRow`` dicts (``.source``, ``.line``).  ``DatasetError`` names
    the file and 1-based line for malformed JSON, non-object lines, missing / ill-typed fields and
    mixed formats; a missing file or one with no rows is an error too.  ``check_format=False``
    reads any JSON objects (RL prompt files, whose rows the caller checks)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset file not found: {p}")
    if not p.is_file():
        raise DatasetError(f"dataset path is not a file: {p}")
    rows: list[dict] = []
    fmt = None
    first_line = None
    try:
        fh = p.open("r", encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {p}: {e}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if not check_format:
                    rows.append(JsonlRow(obj, str(p), lineno))
                    continue
                try:
                    f = detect_format(obj)
                except DatasetError as e:
                    raise DatasetError(f"{where}: {e}") from None
                if fmt is None:
                    fmt, first_line = f, lineno
                elif f != fmt:
                    raise DatasetError(
                        f"{where}: row is in {f!r} format but line {first_line} is {fmt!r}; "
                        "one file must use one format"
                    )
                rows.append(JsonlRow(obj, str(p), lineno))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{p}: not UTF-8 text ({e})") from None
    if not rows:
        raise DatasetError(f"{p}: no rows (empty file)")
    return rows


# ----------------------------------------------------------------------------- tokenization
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _has_generation_tags(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    return isinstance(tpl, str) and _GENERATION_TAG.search(tpl) is not None


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _chat_tokens_and_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[float]]:
    """Tokens of the rendered chat and a 0/1 mask over the assistant turns (content + end
    marker).  Uses ``return_assistant_tokens_mask`` when the template has ``{% generation %}``
    blocks; otherwise renders each prefix and marks the characters each assistant turn adds,
    mapped to tokens through the offsets (fast tokenizers) or token-count differences."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError("the tokenizer has no chat template; cannot use the messages format")
    if _has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = [float(m) for m in out["assistant_masks"]]
        if len(mask) != len(ids):  # pragma: no cover - defensive
            raise DatasetError("chat template assistant mask does not match the tokens")
        return ids, mask

    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        end = _render(tokenizer, messages[: k + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise DatasetError(
                "cannot locate assistant turns: the chat template does not render conversation "
                "prefixes as prefixes of the whole conversation; use a template with "
                "{% generation %} blocks"
            )
        spans.append((len(start), len(end)))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = []
        for a, b in enc["offset_mapping"]:
            inside = any(a < e and b > s for s, e in spans) if b > a else False
            mask.append(1.0 if inside else 0.0)
        return ids, mask
    ids = _encode(tokenizer, full)
    mask = [0.0] * len(ids)
    for s, e in spans:
        a = len(_encode(tokenizer, full[:s]))
        b = len(_encode(tokenizer, full[:e]))
        for i in range(a, min(b, len(ids))):
            mask[i] = 1.0
    return ids, mask


def tokenize_row(row: dict, tokenizer, fmt: Format | None = None) -> tuple[list[int], list[float]]:
    """One row -> ``(tokens, loss_mask)``, one mask value per token (1.0 = trained on)."""
    fmt = fmt or detect_format(row)
    if fmt == "text":
        body = _encode(tokenizer, row["text"]) + _eos(tokenizer)
        bos = _bos(tokenizer)
        return bos + body, [0.0] * len(bos) + [1.0] * len(body)
    if fmt == "prompt_completion":
        prompt = _bos(tokenizer) + _encode(tokenizer, row["prompt"])
        completion = _encode(tokenizer, row["completion"]) + _eos(tokenizer)
        return prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion)
    if fmt == "messages":
        try:
            return _chat_tokens_and_mask(tokenizer, row["messages"])
        except DatasetError:
            raise
        except Exception as e:  # template errors (unknown role, ...)
            raise DatasetError(f"chat template failed: {type(e).__name__}: {e}") from None
    raise DatasetError(f"unknown dataset format {fmt!r} (expected one of {FORMATS})")


def prompt_and_target(row: dict, tokenizer, fmt: Format | None = None) -> tuple[list[int], list[int]]:
    """For generation-based evaluation: ``(prompt_tokens, target_tokens)`` where the model is fed
    ``prompt_tokens`` and should produce ``target_tokens`` (which end with the stop token:
    ``<eos>`` for prompt/completion, the template's end marker for chat).  Prompt/completion:
    ``(<bos> prompt, completion <eos>)``; messages: the conversation up to the last assistant turn
    with the generation prompt, and that turn's masked tokens.  Text rows have no prompt."""
    fmt = fmt or detect_format(row)
    if fmt == "prompt_completion":
        return (
            _bos(tokenizer) + _encode(tokenizer, row["prompt"]),
            _encode(tokenizer, row["completion"]) + _eos(tokenizer),
        )
    if fmt == "messages":
        msgs = row["messages"]
        if msgs[-1]["role"] != "assistant":
            raise DatasetError(f"{_where(row)}: the last message is not an assistant turn")
        tokens, mask = tokenize_row(row, tokenizer, fmt)
        # the last assistant turn = the last run of masked tokens
        end = max(i for i, m in enumerate(mask) if m > 0) + 1
        start = end
        while start > 0 and mask[start - 1] > 0:
            start -= 1
        return tokens[:start], tokens[start:end]
    raise DatasetError(f"{_where(row)}: prompt_and_target needs prompt/completion or messages rows, got {fmt!r}")


# ----------------------------------------------------------------------------- examples
def build_examples(
    rows: list[dict],
    tokenizer,
    adapter: str | None,
    max_length: int,
    overflow: Literal["truncate", "skip"] = "truncate",
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize ``rows`` into ``Example``s for ``adapter``.

    A sequence longer than ``max_length`` tokens is truncated to its first ``max_length`` tokens
    (``overflow="truncate"``) or dropped (``"skip"``).  Rows left with no loss token (or fewer
    than 2 tokens) are dropped too.  ``stats``: ``rows`` (read), ``examples`` (kept),
    ``truncated``, ``skipped`` (= ``skipped_too_long + skipped_no_loss``), ``tokens`` (positions
    of the kept examples, i.e. ``sum(len(ex.input_tokens))``), ``loss_tokens`` (positions with
    weight > 0).  Each example's ``meta`` holds the row's extra keys, ``source`` ("file:line")
    when known, ``format``, ``prompt_tokens`` (tokens before the first trained one) and
    ``truncated``."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f'overflow must be "truncate" or "skip", got {overflow!r}')
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    fmt = rows_format(rows)
    keys = set(_FORMAT_KEYS[fmt])
    stats = dict(rows=len(rows), examples=0, truncated=0, skipped=0, skipped_too_long=0,
                 skipped_no_loss=0, tokens=0, loss_tokens=0)
    examples: list[Example] = []
    for i, row in enumerate(rows):
        try:
            tokens, mask = tokenize_row(row, tokenizer, fmt)
        except DatasetError as e:
            raise DatasetError(f"{_where(row, i)}: {e}") from None
        truncated = False
        if len(tokens) > max_length:
            if overflow == "skip":
                stats["skipped"] += 1
                stats["skipped_too_long"] += 1
                continue
            tokens, mask = tokens[:max_length], mask[:max_length]
            truncated = True
        # the first token is never predicted, so its mask value does not count
        if len(tokens) < 2 or not any(m > 0 for m in mask[1:]):
            stats["skipped"] += 1
            stats["skipped_no_loss"] += 1
            continue
        ex = Example.from_tokens(adapter, tokens, mask)
        meta = {k: v for k, v in row.items() if k not in keys}
        where = getattr(row, "where", None)
        if where:
            meta["source"] = where
        meta["format"] = fmt
        meta["prompt_tokens"] = next(j for j, m in enumerate(mask) if m > 0 and j > 0)
        meta["truncated"] = truncated
        ex.meta = meta
        stats["truncated"] += int(truncated)
        stats["examples"] += 1
        stats["tokens"] += len(ex.input_tokens)
        stats["loss_tokens"] += sum(1 for w in ex.weights if w > 0)
        examples.append(ex)
    return examples, stats


def load_examples(
    path: str | Path,
    tokenizer,
    adapter: str | None,
    max_length: int,
    overflow: Literal["truncate", "skip"] = "truncate",
) -> tuple[list[Example], dict[str, int]]:
    """``read_jsonl`` + ``build_examples``; ``stats`` also gets ``path`` and ``format``."""
    rows = read_jsonl(path)
    examples, stats = build_examples(rows, tokenizer, adapter, max_length, overflow)
    stats = dict(stats, path=str(path), format=rows_format(rows))
    return examples, stats


def split_eval(
    examples: list,
    eval_fraction: float | None = None,
    eval_count: int | None = None,
    seed: int = 0,
) -> tuple[list, list]:
    """Deterministic ``(train, eval)`` split: ``eval_count`` items (or ``round(eval_fraction * n)``,
    at least 1) drawn with ``random.Random(seed)``; both parts keep the input order.  Exactly one
    of ``eval_fraction`` / ``eval_count``; train must keep at least one item."""
    if (eval_fraction is None) == (eval_count is None):
        raise ValueError("split_eval: give exactly one of eval_fraction and eval_count")
    n = len(examples)
    if eval_fraction is not None:
        if not (0.0 <= eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        k = 0 if eval_fraction == 0 else max(1, int(round(eval_fraction * n)))
    else:
        if eval_count < 0:  # type: ignore[operator]
            raise ValueError(f"eval_count must be >= 0, got {eval_count}")
        k = int(eval_count)  # type: ignore[arg-type]
    if k and k >= n:
        raise DatasetError(f"split_eval: cannot hold out {k} of {n} examples and keep any to train on")
    rng = random.Random(f"lorafleet-split:{seed}")
    held = set(rng.sample(range(n), k))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    ev = [ex for i, ex in enumerate(examples) if i in held]
    return train, ev


# ----------------------------------------------------------------------------- batches
def _fingerprint(examples: list) -> str:
    h = hashlib.sha256()
    for ex in examples:
        if isinstance(ex, Example):
            h.update(json.dumps([ex.adapter, ex.input_tokens, ex.target_tokens, ex.weights]).encode())
        else:  # any other JSON-able item (e.g. RL prompts: token ids and their row)
            h.update(json.dumps(ex, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class DataCursor:
    """Deterministic, resumable batches over ``examples``.

    Epoch ``e`` visits every example once in the order of a shuffle seeded by ``(seed, e)``
    (``random.Random``; no shuffle with ``shuffle=False``).  ``next_batch(n)`` takes the next
    ``n``; a batch that runs past the end of an epoch continues into the next one, reshuffled.
    ``epoch`` is the epoch being read, ``position`` the index into its order, ``epochs_done`` the
    number of epochs fully read.  ``state_dict()`` / ``load_state_dict()`` resume exactly: a
    cursor loaded from a saved state draws the same batches as the original would have.
    """

    def __init__(self, examples: list, seed: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("DataCursor needs at least one example")
        self.examples = list(examples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None
        self._order_epoch = -1
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def epochs_done(self) -> int:
        return self.epoch

    @property
    def examples_seen(self) -> int:
        return self.epoch * len(self.examples) + self.position

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.examples) / batch_size)

    def order(self, epoch: int | None = None) -> list[int]:
        """The visiting order (indices into ``examples``) of ``epoch`` (default: the current)."""
        epoch = self.epoch if epoch is None else epoch
        if self._order is not None and self._order_epoch == epoch:
            return self._order
        idx = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"lorafleet-cursor:{self.seed}:{epoch}").shuffle(idx)
        self._order, self._order_epoch = idx, epoch
        return idx

    def next_batch(self, batch_size: int) -> list:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        while len(out) < batch_size:
            order = self.order()
            take = min(batch_size - len(out), len(order) - self.position)
            out.extend(self.examples[i] for i in order[self.position : self.position + take])
            self.position += take
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
        return out

    def __iter__(self):
        """Iterate over single examples forever (use ``next_batch`` for batches)."""
        while True:
            yield self.next_batch(1)[0]

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = _fingerprint(self.examples) if all(isinstance(e, Example) for e in self.examples) else ""
        return self._fp

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.examples),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        n = state.get("num_examples", len(self.examples))
        if n != len(self.examples):
            raise ValueError(
                f"DataCursor state is for {n} examples but this cursor has {len(self.examples)}: "
                "the dataset changed since the checkpoint"
            )
        fp = state.get("fingerprint")
        if fp and self.fingerprint() and fp != self.fingerprint():
            raise ValueError("DataCursor state fingerprint differs: the dataset changed since the checkpoint")
        position = int(state["position"])
        if not 0 <= position < len(self.examples):
            raise ValueError(f"DataCursor state position {position} out of range")
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = position
        self._order, self._order_epoch = None, -1


# ----------------------------------------------------------------------------- eval helper
def completion_exact_match(
    pred_tokens: Iterable[int],
    target_tokens: Iterable[int],
    stop_ids: Iterable[int] | None = None,
) -> bool:
    """Whether a generated completion matches the target exactly.

    Without ``stop_ids``: ``pred[:len(target)] == target`` -- so a target that ends with its stop
    token (as ``prompt_and_target`` gives) must also be stopped at the right place; whatever the
    model generates after it is ignored.  With ``stop_ids``: both are cut after their first stop
    token (kept) and compared whole."""
    pred, target = list(pred_tokens), list(target_tokens)
    if stop_ids is None:
        return pred[: len(target)] == target

    stops = set(stop_ids)

    def cut(seq):
        for i, t in enumerate(seq):
            if t in stops:
                return seq[: i + 1]
        return seq

    return cut(pred) == cut(target)
