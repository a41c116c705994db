"""Slot bank, routing and the multi-LoRA layers (no transformers imports)."""

from .bank import SlotBank, SlotInfo
from .embedding import MultiLoRAEmbedding
from .experts import MultiLoRAExperts
from .linear import MultiLoRALinear
from .routing import Routing, current_routing, use_routing

__all__ = [
    "SlotBank", "SlotInfo", "MultiLoRALinear", "MultiLoRAExperts", "MultiLoRAEmbedding",
    "Routing", "current_routing", "use_routing",
]
