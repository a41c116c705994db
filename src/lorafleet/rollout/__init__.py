"""Rollout engines: push adapter snapshots into vLLM / SGLang and sample there (imports engine +
adapters only)."""

from .base import RolloutEngine, RolloutError

__all__ = ["RolloutEngine", "RolloutError"]
