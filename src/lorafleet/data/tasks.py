"""Small synthetic tasks for the quickstart (bundled under ``examples/data``).

Every task is prompt/completion text whose prompt names the task, so one adapter can be evaluated
on another task's prompts and show what it does there (specialization shown, not claimed)::

    rev    "rev: bdca ="   -> " acdb"   reverse the letters
    sort   "sort: bdca ="  -> " abcd"   sort the letters
    upper  "upper: bdca =" -> " BDCA"   upper-case the letters
    rot    "rot: bdha ="   -> " ceab"   shift each letter by one within a-h (h -> a)
    add    "add: 12+35 ="  -> " 47"     add two numbers (0-99)

Letter tasks draw 3-4 letters from ``a``-``h`` (repeats allowed; 4608 possible inputs): a small
alphabet and short strings so a tiny model learns them in a few hundred steps (measured with a
full fine-tune of the random-init ``qwen3_moe`` debug model, batch 32, AdamW 3e-3, 200 steps:
rev 0.98, sort 0.94, upper 0.98 exact match on the held-out rows; with ``a``-``z`` and 3-5 letters
rev reached 0.84 and upper 0.36).  ``add`` is markedly harder (carries) -- not in the quickstart
set.  With the character-level tokenizer a sequence (``<bos>`` prompt completion ``<eos>``)
is 16-20 tokens for the letter tasks (at most 1 + 13 + 5 + 1 for ``upper``) and 15-18 for
``add``.  ``generate_task(name, n, seed)`` returns ``n`` rows with distinct prompts; the rows
for the letter tasks use the same letter strings for the same ``(n, seed)``, so their eval sets
pose the same inputs under different task names.

    python -m lorafleet.data.tasks --out examples/data

writes ``<task>_train.jsonl`` (400 rows) and ``<task>_eval.jsonl`` (50 held-out rows, prompts
disjoint from train) for every task, plus ``chat_reverse.jsonl`` (messages format) and
``text_upper.jsonl`` (text format).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "Task",
    "TASKS",
    "QUICKSTART_TASKS",
    "generate_task",
    "generate_chat_reverse",
    "generate_text_upper",
    "write_task_files",
    "main",
]

LETTERS = string.ascii_lowercase[:8]  # "abcdefgh"
MIN_LEN, MAX_LEN = 3, 4


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    draw: Callable[[random.Random], str]  # the task input (letters, or "a+b")
    answer: Callable[[str], str]  # input -> answer (without the leading space)

    def row(self, x: str) -> dict:
        return {"prompt": f"{self.name}: {x} =", "completion": f" {self.answer(x)}", "task": self.name}


def _letters(rng: random.Random) -> str:
    k = rng.randint(MIN_LEN, MAX_LEN)
    return "".join(rng.choice(LETTERS) for _ in range(k))


def _numbers(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


def _rot1(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def _add(s: str) -> str:
    a, b = s.split("+")
    return str(int(a) + int(b))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("rev", "reverse the letters", _letters, lambda s: s[::-1]),
        Task("sort", "sort the letters", _letters, lambda s: "".join(sorted(s))),
        Task("upper", "upper-case the letters", _letters, str.upper),
        Task("rot", "shift each letter by one (h -> a)", _letters, _rot1),
        Task("add", "add two numbers 0-99", _numbers, _add),
    )
}
# The tasks the quickstart trains one adapter each on (any subset of TASKS works).
QUICKSTART_TASKS: tuple[str, ...] = ("rev", "sort", "upper")


def _distinct_inputs(draw: Callable[[random.Random], str], n: int, seed: int) -> list[str]:
    # The RNG is seeded by the input *kind*, not the task name, so the letter tasks share inputs.
    rng = random.Random(f"lorafleet-task:{draw.__name__}:{seed}")
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    while len(out) < n:
        x = draw(rng)
        tries += 1
        if x not in seen:
            seen.add(x)
            out.append(x)
        elif tries > 100 * n + 1000:  # pragma: no cover - spaces here are far bigger than n
            raise ValueError(f"cannot draw {n} distinct inputs")
    return out


def generate_task(name: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion rows of task ``name`` with distinct prompts (deterministic)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    task = TASKS[name]
    return [task.row(x) for x in _distinct_inputs(task.draw, n, seed)]


def generate_chat_reverse(n: int, seed: int = 0) -> list[dict]:
    """Chat-format rows of the reverse task: some with a system turn, some with two rounds."""
    rng = random.Random(f"lorafleet-chat-reverse:{seed}")
    xs = _distinct_inputs(_letters, 2 * n, seed + 1000)
    rows = []
    for i in range(n):
        a, b = xs[2 * i], xs[2 * i + 1]
        msgs = []
        kind = rng.randrange(3)
        if kind == 1:
            msgs.append({"role": "system", "content": "Reverse the letters."})
        msgs += [{"role": "user", "content": f"reverse {a}"}, {"role": "assistant", "content": a[::-1]}]
        if kind == 2:
            msgs += [{"role": "user", "content": f"reverse {b}"}, {"role": "assistant", "content": b[::-1]}]
        rows.append({"messages": msgs, "task": "rev"})
    return rows


def generate_text_upper(n: int, seed: int = 0) -> list[dict]:
    """Text-format rows of the upper-case task: ``{"text": "upper: abc = ABC"}``."""
    return [{"text": r["prompt"] + r["completion"], "task": "upper"} for r in generate_task("upper", n, seed + 2000)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=True) + "\n")


def write_task_files(
    out: str | Path,
    tasks: list[str] | tuple[str, ...] | None = None,
    n_train: int = 400,
    n_eval: int = 50,
    seed: int = 0,
    n_extra: int = 200,
) -> list[Path]:
    """Write ``<task>_train.jsonl`` / ``<task>_eval.jsonl`` (disjoint prompts) for each task, plus
    ``chat_reverse.jsonl`` and ``text_upper.jsonl`` (``n_extra`` rows each).  Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tasks or tuple(TASKS):
        rows = generate_task(name, n_train + n_eval, seed)
        for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
            p = out / f"{name}_{split}.jsonl"
            _write_jsonl(p, part)
            written.append(p)
    for fname, rows in (("chat_reverse.jsonl", generate_chat_reverse(n_extra, seed)),
                        ("text_upper.jsonl", generate_text_upper(n_extra, seed))):
        p = out / fname
        _write_jsonl(p, rows)
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the bundled synthetic task datasets.")
    ap.add_argument("--out", default="examples/data")
    ap.add_argument("--tasks", nargs="*", default=None, help=f"default: all of {list(TASKS)}")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in write_task_files(args.out, args.tasks, args.train, args.eval, args.seed):
        print(p)


if __name__ == "__main__":
    main()
