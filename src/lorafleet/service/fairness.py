"""Fair scheduling (issue 14, finding 1): deficit round-robin over tenants, priced in tokens.

The scheduler's worker runs in cycles. Each cycle every tenant with work (queued operations or
running decodes) is granted ``quantum`` tokens of credit (``serve --fair-share-tokens``); a
tenant's queued operations are taken, oldest first, while their price fits its credit, and
what is left pays for pieces of its running decodes. A tenant with no work keeps no credit.
So whatever one tenant submits — one 128 × 4096 sample or a thousand requests — it gets about
``quantum`` tokens of work per cycle, and another tenant's small request runs in the next cycle
or two. An operation dearer than the quantum waits while its tenant's credit builds up over a
few cycles (at once when nobody else has work: `DeficitRoundRobin.fast_forward`).

Prices are forward-token equivalents: a ``forward_backward`` costs 3 per input token (forward
and backward), a ``forward`` 1; a decode step costs 1 per live row plus `STEP_TOKENS` (a step
reads every weight once, however few its rows); a new sample pays for its prefill (rows ×
prompt, plus the prompt-logprobs forward); control operations (optim_step, save, create...)
cost `CONTROL_TOKENS`.

Decodes (`RunningDecode`) stay in flight between cycles as `DecodeState`s: each cycle one
piece of at most ``decode_chunk_tokens`` steps, with other tenants' work between pieces, and
the samples are those of one uninterrupted `fleet.sample` (engine/decode_state.py). Several
tenants' requests started in the same cycle with equal sampling parameters share one decode
batch; each tenant pays for its own rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

CONTROL_TOKENS = 64  # what one control operation is priced at
STEP_TOKENS = 8  # a decode step's fixed cost, on top of one token per live row
BACKWARD_FACTOR = 3  # a forward_backward token: the forward and a backward of about twice its cost


def op_price(op, whole_decode: bool = False) -> int:
    """Tokens of work a queued operation costs when it is taken (``whole_decode``: a sample is
    decoded to its end in the cycle that takes it, so it pays for every step now)."""
    if op.kind == "fwdbwd":
        tokens = sum(len(e.input_tokens) for e in op.examples)
        forward_only = bool(op.group[2]) if op.group else False
        return max(1, tokens * (1 if forward_only else BACKWARD_FACTOR))
    if op.kind == "sample":
        s = op.sample
        prompt = len(s["prompt"])
        price = s["num_samples"] * prompt + STEP_TOKENS + (prompt if s["prompt_logprobs"] else 0)
        if whole_decode:
            price += s["params"].max_tokens * (s["num_samples"] + STEP_TOKENS)
        return price
    return CONTROL_TOKENS


class DeficitRoundRobin:
    """Per-tenant credit in tokens (deficit round-robin with a quantum per cycle)."""

    def __init__(self, quantum: int):
        if not isinstance(quantum, int) or quantum < 1:
            raise ValueError(f"the fair share per tenant and cycle must be >= 1 token, got {quantum!r}")
        self.quantum = quantum
        self.credit: dict[str, float] = {}

    def grant(self, active: set[str]) -> None:
        """A new cycle: every tenant with work gets a quantum; the others lose their credit."""
        for t in list(self.credit):
            if t not in active:
                del self.credit[t]
        for t in active:
            self.credit[t] = self.credit.get(t, 0.0) + self.quantum

    def fast_forward(self, wants: dict[str, int]) -> None:
        """Nothing affordable this cycle (``wants``: each waiting tenant's cheapest next price):
        run the empty rounds at once, until the first tenant can pay."""
        rounds = min(math.ceil((price - self.credit.get(t, 0.0)) / self.quantum) for t, price in wants.items())
        if rounds > 0:
            for t in wants:
                self.credit[t] = self.credit.get(t, 0.0) + rounds * self.quantum

    def afford(self, tenant: str, price: float) -> bool:
        return price <= self.credit.get(tenant, 0.0)

    def charge(self, tenant: str, price: float) -> None:
        self.credit[tenant] = self.credit.get(tenant, 0.0) - price


@dataclass
class RunningDecode:
    """A sample batch in flight: its `DecodeState`, the requests (ops) it answers and their
    prompt logprobs. ``request i`` of the state is ``ops[i]``."""

    state: object
    ops: list
    prompt_logprobs: dict
    bytes: int = 0  # the memory budget's estimate of what it holds (its KV cache...)
    started: float = field(default_factory=time.monotonic)

    @property
    def adapters(self) -> set[str]:
        return {op.sample["adapter"] for op in self.ops if op.sample["adapter"] is not None}

    @property
    def tenants(self) -> set[str]:
        return {op.tenant for op in self.ops}

    def tokens_left(self) -> int:
        """At most this many tokens are still to decode (rows may stop early)."""
        return len(self.state.live_rows()) * max(0, self.state.params.max_tokens - self.state.steps)

    def step_shares(self) -> dict[str, float]:
        """Each tenant's price of one more decode step: its live rows and its part of the fixed cost."""
        live = self.state.live_rows()
        if not live:
            return {}
        rows: dict[str, int] = {}
        for r in live:
            t = self.ops[r.request].tenant
            rows[t] = rows.get(t, 0) + 1
        return {t: n * (1 + STEP_TOKENS / len(live)) for t, n in rows.items()}


def plan_pieces(decodes: list[RunningDecode], drr: DeficitRoundRobin, chunk: int) -> list[tuple[RunningDecode, int]]:
    """(decode, steps) for this cycle: each decode, oldest first, takes as many steps (at most
    ``chunk``) as the poorest of its tenants can pay for, and every tenant pays for its rows."""
    out = []
    for d in decodes:
        shares = d.step_shares()
        if not shares:
            continue
        steps = min(chunk, min(int(drr.credit.get(t, 0.0) // s) for t, s in shares.items()))
        if steps < 1:
            continue
        for t, s in shares.items():
            drr.charge(t, s * steps)
        out.append((d, steps))
    return out
