"""Verifiable reward functions for examples/rl_quickstart.yaml.

Each is called as ``fn(prompt, completion, row) -> float`` with the decoded prompt, the decoded
completion (special tokens removed) and the prompt's dataset row.
"""


def _body(completion: str) -> str:
    return completion.split("\n")[0].strip()


def shout(prompt: str, completion: str, row: dict) -> float:
    """Format reward: the share of the answer's letters that are upper case (0 without letters)."""
    letters = [c for c in _body(completion) if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def terse(prompt: str, completion: str, row: dict) -> float:
    """Length reward: 1 for an answer of at most one character, falling linearly to 0 at seven."""
    n = len(_body(completion))
    return max(0.0, 1.0 - max(0, n - 1) / 6)
