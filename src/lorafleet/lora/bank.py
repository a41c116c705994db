"""Host-side slot table shared by every LoRA layer of one fleet."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def init_slot_layer(layer: nn.Module, base: nn.Module, bank: SlotBank, path: str, fan_in: int, fan_out: int,
                    dtype=None) -> tuple[nn.Parameter, nn.Parameter]:
    """What every dense slot layer (linear, embedding) sets up around ``base``: its bank and path,
    per-slot targeting and scale overrides, and zeroed factors ``A [S, R, fan_in]``,
    ``B [S, fan_out, R]`` in ``dtype`` (default: the base's) on the base's device, returned for
    the layer to register under its own (PEFT) names."""
    layer.base_layer = base
    layer.bank = bank
    layer.path = path
    layer.short_name = path.rsplit(".", 1)[-1]
    S, R = bank.max_adapters, bank.max_rank
    dtype = dtype or base.weight.dtype
    dev = base.weight.device
    layer.enabled = [False] * S  # does slot s target this module
    # slot -> this module's LoRA scale where it is not the slot's (PEFT rank_pattern / alpha_pattern)
    layer.scale_override = {}
    return (nn.Parameter(torch.zeros(S, R, fan_in, dtype=dtype, device=dev)),
            nn.Parameter(torch.zeros(S, fan_out, R, dtype=dtype, device=dev)))
