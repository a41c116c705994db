"""lorafleet: train many LoRA adapters at once on one frozen dense or MoE base model."""

from .config import AdapterConfig
from .engine import Fleet

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "Fleet", "__version__"]
