"""lorafleet: train many LoRA adapters at once on one frozen dense or MoE base model."""

from .config import AdapterConfig
from .engine import Fleet, ForwardBackwardResult, OptimConfig, SampledSequence, SampleRequest, SamplingParams
from .types import Example

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "Example", "Fleet", "ForwardBackwardResult", "OptimConfig",
    "SampleRequest", "SamplingParams", "SampledSequence", "__version__",
]
