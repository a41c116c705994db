"""Plain data passed between the data pipeline, the engine and the service."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One training row (the Tinker convention): position i of ``input_tokens`` predicts
    ``target_tokens[i]``; ``weights[i]`` scales that token's loss (0 = not trained on).

    Loss-specific arrays, one value per position: ``logprobs`` (the sampler's logprobs of the
    targets, for importance_sampling / ppo / cispo) and ``advantages``. For ``dpo``, examples
    come in consecutive (chosen, rejected) pairs of the same adapter.
    """

    adapter: str | None
    input_tokens: list[int]
    target_tokens: list[int]
    weights: list[float] | None = None
    logprobs: list[float] | None = None
    advantages: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.input_tokens)
        if n == 0:
            raise ValueError("Example.input_tokens is empty")
        if len(self.target_tokens) != n:
            raise ValueError(
                f"Example: target_tokens has {len(self.target_tokens)} entries, input_tokens {n}"
            )
        for field_name in ("weights", "logprobs", "advantages"):
            v = getattr(self, field_name)
            if v is not None and len(v) != n:
                raise ValueError(f"Example: {field_name} has {len(v)} entries, input_tokens {n}")
        if self.weights is None:
            self.weights = [1.0] * n

    @staticmethod
    def from_tokens(adapter: str | None, tokens: list[int], weights: list[float] | None = None) -> "Example":
        """A full sequence -> shifted (input, target) pair; ``weights`` are per *token of
        ``tokens``* and the first token (never predicted) is dropped."""
        if len(tokens) < 2:
            raise ValueError("Example.from_tokens needs at least 2 tokens")
        w = None if weights is None else list(weights[1:])
        return Example(adapter, list(tokens[:-1]), list(tokens[1:]), w)
