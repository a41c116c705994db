"""Slot bank, routing and the multi-LoRA layers (no transformers imports)."""

from .bank import SlotBank, SlotInfo
from .experts import MultiLoRAExperts
from .linear import MultiLoRALinear
from .routing import Routing, current_routing, use_routing

__all__ = [
    "SlotBank", "SlotInfo", "MultiLoRALinear", "MultiLoRAExperts",
    "Routing", "current_routing", "use_routing",
]
