"""Verifiable reward functions for examples/rl_quickstart.yaml.

Each is called as ``fn(prompt, completion, row) -> float`` with the decoded prompt, the decoded
completion and the prompt's dataset row.
"""


def _body(completion: str) -> str:
    return completion.split("\n")[0].strip()


def shout(prompt: str, completion: str, row: dict) -> float:
    """Format reward: the share of letters in the answer that are upper case (0 without letters)."""
    letters = [c for c in _body(completion) if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def digits(prompt: str, completion: str, row: dict) -> float:
    """Answer reward: the share of the answer's characters that are digits, minus a small length
    penalty so the policy does not just ramble."""
    body = _body(completion).replace(" ", "")
    if not body:
        return 0.0
    return sum(c.isdigit() for c in body) / len(body) - 0.02 * max(0, len(body) - 6)
