"""Rollout engines: push adapter snapshots into vLLM / SGLang and sample there (imports engine +
adapters only)."""

from .base import RolloutEngine, RolloutError

__all__ = ["ENGINES", "RolloutEngine", "RolloutError", "RolloutUnavailable", "make_engine"]

ENGINES = ("vllm", "vllm-local", "sglang")


class RolloutUnavailable(ValueError):
    """A rollout engine this version of lorafleet has no sink for (a user's config choice: one line)."""


def make_engine(spec: dict, *, base_dir: str, max_rank: int) -> RolloutEngine:
    """The engine a ``rollout:`` spec names. No sink (vLLM HTTP, vLLM local, SGLang HTTP) is built
    yet, so every engine is refused by name at the job's start — never a silent fall-back to the
    built-in sampler, which would train on a different behaviour policy than the user asked for."""
    name = spec.get("engine")
    raise RolloutUnavailable(
        f"rollout engine {name!r} is not available in this version of lorafleet: its sink is not built yet "
        f"(known engines: {', '.join(ENGINES)}); remove the rollout: block to sample with the built-in sampler")
