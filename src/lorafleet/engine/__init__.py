"""The `Fleet` API (no web framework imports)."""

from .fleet import Fleet
from .optim import OptimConfig
from .training import ForwardBackwardResult

__all__ = ["Fleet", "OptimConfig", "ForwardBackwardResult"]
