"""What a rollout engine (vLLM, SGLang) offers the trainer: push a snapshot, sample with it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..engine.sampling import SampledSequence, SamplingParams
from ..engine.snapshot import Snapshot


class RolloutError(RuntimeError):
    """An engine refused or could not be reached; the message names the engine's answer."""


class RolloutRefused(RolloutError):
    """A refusal that no retry can change (a rank above the engine's limit, an engine without
    LoRA, a layout it cannot take): callers stop at once instead of retrying."""


@runtime_checkable
class RolloutEngine(Protocol):
    def push(self, snap: Snapshot) -> str:
        """Load or replace the adapter in the engine; returns the name to sample with."""

    def generate(self, adapter: str | None, prompts: list[list[int]], params: SamplingParams, n: int
                 ) -> list[list[SampledSequence]]:
        """Per prompt, ``n`` samples with the engine's per-token sampled logprobs."""

    def prompt_logprobs(self, adapter: str | None, tokens: list[int]) -> list[float | None]:
        """Logprob of every token given the ones before it; None at position 0."""

    def close(self) -> None:
        """Release the engine (stop a server this process started)."""
