"""The `Fleet` API (no web framework imports)."""

from .fleet import Fleet
from .optim import LossScaler, OptimConfig
from .sampling import SampledSequence, SampleRequest, SamplingParams
from .training import ForwardBackwardResult

__all__ = ["Fleet", "LossScaler", "OptimConfig", "ForwardBackwardResult", "SampleRequest", "SamplingParams", "SampledSequence"]
