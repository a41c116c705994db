"""Host-side slot table shared by every LoRA layer of one fleet."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlotInfo:
    name: str
    rank: int
    scale: float
    experts: bool
    expert_sharing: str  # "none" | "shared_a" | "shared_outer"


class SlotBank:
    """``max_adapters`` slots of rank up to ``max_rank``. Layers read rank/scale from here; the
    tensors themselves live on the layers (``A[S, R, in]``, ``B[S, out, R]``)."""

    def __init__(self, max_adapters: int, max_rank: int):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters and max_rank must be >= 1, got {max_adapters}, {max_rank}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.slots: list[SlotInfo | None] = [None] * max_adapters

    def free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    def info(self, slot: int) -> SlotInfo:
        info = self.slots[slot]
        assert info is not None, f"slot {slot} is empty"
        return info
