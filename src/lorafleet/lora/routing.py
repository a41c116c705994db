"""Per-forward routing metadata, built once and read by every LoRA layer.

The fleet lays a batch out adapter-major, so each slot's tokens form one contiguous run of the
flattened ``[batch * seq]`` token axis. ``segments`` lists those runs; ``token_slot`` gives each
token's slot (-1: base model) for layers that permute tokens (MoE experts).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_CURRENT: contextvars.ContextVar["Routing | None"] = contextvars.ContextVar("lorafleet_routing", default=None)


@dataclass(frozen=True)
class Routing:
    """Which slot each batch row uses. ``row_segments`` are (slot, first_row, end_row) runs of
    an adapter-major batch; a layer whose input holds ``k`` tokens per row (the step's tokens,
    or DeepSeek MLA's whole cached latent sequence) gets token runs scaled by ``k``."""

    num_rows: int
    row_slots: torch.Tensor  # [num_rows] int64, -1 for base-model rows
    row_segments: tuple[tuple[int, int, int], ...]  # (slot, first_row, end_row), slot >= 0
    # LoRA dropout of this forward: slot -> (p, seed, counter) for the slots whose dense LoRA
    # drops inputs (train mode, p > 0). Part of the routing, so an activation-checkpoint
    # recompute (RoutingCheckpoint) draws the very same masks.
    dropout: dict = field(default_factory=dict, compare=False)
    _by_width: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def from_row_slots(row_slots: list[int], device, dropout: dict | None = None) -> "Routing":
        """Rows must already be grouped by slot (adapter-major)."""
        segments, start = [], 0
        for i in range(1, len(row_slots) + 1):
            if i == len(row_slots) or row_slots[i] != row_slots[start]:
                if row_slots[start] >= 0:
                    segments.append((row_slots[start], start, i))
                start = i
        slots = sorted({s for s, _, _ in segments})
        assert len(slots) == len(segments), f"rows are not adapter-major: {row_slots}"
        return Routing(len(row_slots), torch.tensor(row_slots, dtype=torch.long, device=device), tuple(segments),
                       dict(dropout or {}))

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(s for s, _, _ in self.row_segments)

    def tokens_per_row(self, num_tokens: int, where: str) -> int:
        if num_tokens % self.num_rows:
            raise ValueError(
                f"{where}: got {num_tokens} tokens, not a multiple of the {self.num_rows} routed rows; "
                "call the model through Fleet.forward"
            )
        return num_tokens // self.num_rows

    def segments(self, num_tokens: int, where: str = "layer") -> tuple[tuple[int, int, int], ...]:
        """(slot, start, end) token runs of a batch-major input holding ``num_tokens`` tokens."""
        k = self.tokens_per_row(num_tokens, where)
        key = ("seg", k)
        if key not in self._by_width:
            self._by_width[key] = tuple((s, a * k, b * k) for s, a, b in self.row_segments)
        return self._by_width[key]

    def token_slot(self, num_tokens: int, where: str = "layer") -> torch.Tensor:
        k = self.tokens_per_row(num_tokens, where)
        key = ("slot", k)
        if key not in self._by_width:
            self._by_width[key] = self.row_slots.repeat_interleave(k)
        return self._by_width[key]


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
