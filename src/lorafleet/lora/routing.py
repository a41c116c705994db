"""Per-forward routing metadata, built once and read by every LoRA layer.

The fleet lays a batch out adapter-major, so each slot's tokens form one contiguous run of the
flattened ``[batch * seq]`` token axis. ``segments`` lists those runs; ``token_slot`` gives each
token's slot (-1: base model) for layers that permute tokens (MoE experts).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_CURRENT: contextvars.ContextVar["Routing | None"] = contextvars.ContextVar("lorafleet_routing", default=None)


@dataclass(frozen=True)
class Routing:
    num_tokens: int
    token_slot: torch.Tensor  # [num_tokens] int64, -1 for base-model tokens
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) token runs, slot >= 0

    @staticmethod
    def from_row_slots(row_slots: list[int], seq_len: int, device) -> "Routing":
        """Rows must already be grouped by slot (adapter-major)."""
        segments, start = [], 0
        for i in range(1, len(row_slots) + 1):
            if i == len(row_slots) or row_slots[i] != row_slots[start]:
                if row_slots[start] >= 0:
                    segments.append((row_slots[start], start * seq_len, i * seq_len))
                start = i
        slots = sorted({s for s, _, _ in segments})
        assert len(slots) == len(segments), f"rows are not adapter-major: {row_slots}"
        token_slot = torch.tensor(row_slots, dtype=torch.long, device=device).repeat_interleave(seq_len)
        return Routing(len(row_slots) * seq_len, token_slot, tuple(segments))

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(s for s, _, _ in self.segments)


def current_routing() -> Routing | None:
    return _CURRENT.get()


@contextmanager
def use_routing(routing: Routing | None):
    token = _CURRENT.set(routing)
    try:
        yield routing
    finally:
        _CURRENT.reset(token)


class RoutingCheckpoint:
    """Wraps a layer's activation-checkpoint function so the recompute in backward sees the
    routing that was current during the forward (not whatever is current when backward runs)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, fn, *args, **kwargs):
        routing = current_routing()

        def run(*a, **k):
            with use_routing(routing):
                return fn(*a, **k)

        return self.inner(run, *args, **kwargs)
