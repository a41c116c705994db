"""A large ``forward_backward`` / ``forward`` cut into micro-batches that run in successive
scheduler cycles (issue 14: one tenant's 256 datums × 2,000 tokens no longer hold everyone).

A request whose price (fairness.py's, in forward-token equivalents) exceeds ``max_step_tokens``
leaves its model's queue as a `RunningSplit`: the whole batch is validated first (a bad datum
anywhere answers 400 and nothing runs), then each cycle its tenant's credit pays for as many
pieces as it can (at least one piece per cycle when nothing else could run), with other
tenants' work between them; pieces of several splits with equal loss_fn and config run as one
mixed call, so large requests of several tenants stay batched together. Pieces are whole datums (DPO pairs together), each priced at most
``max_step_tokens`` (a datum dearer than that alone is one piece). Exact: losses are per-datum
sums and an adapter's gradients accumulate across calls until its optim_step, so the pieces add
up to the uncut call, as `BudgetedFleet`'s micro-batches do; the answer (losses and logprobs in
datum order, metrics) is built once, at the end, from the pieces' results concatenated.

While a split runs its model's later operations (optim_step, another forward_backward, save)
wait: tinker's semantics are sequential per model. If a piece fails after others were applied,
the model's pending gradient is dropped (the failure says so), so none of the failed request
leaks into the next optim_step.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from dataclasses import dataclass, field

from .budget_fleet import _engine
from .fairness import BACKWARD_FACTOR
from .futures import Failure

log = logging.getLogger("lorafleet.service")


def piece_ranges(lengths: list[int], max_price: int, forward_only: bool, dpo: bool) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` ranges of whole datums (pairs for DPO), each priced at most
    ``max_price`` unless one datum (pair) alone is dearer."""
    per_token = 1 if forward_only else BACKWARD_FACTOR
    step = 2 if dpo else 1
    out, start, price = [], 0, 0
    for i in range(0, len(lengths), step):
        unit = sum(lengths[i:i + step]) * per_token
        if i > start and price + unit > max_price:
            out.append((start, i))
            start, price = i, 0
        price += unit
    out.append((start, len(lengths)))
    return out


@dataclass
class RunningSplit:
    """A split request in flight: its op, its pieces and what the pieces answered so far."""

    op: object
    ranges: list
    done: int = 0  # pieces run
    logprobs: list = field(default_factory=list)
    losses: list = field(default_factory=list)

    def next_price(self) -> int:
        a, b = self.ranges[self.done]
        per_token = 1 if self.op.group[2] else BACKWARD_FACTOR
        return max(1, sum(len(e.input_tokens) for e in self.op.examples[a:b]) * per_token)


@dataclass
class _Pieces:
    """What the scheduler's `_fwdbwd_result` reads of a forward_backward result."""

    logprobs: list
    losses: list


class SplitRunning:
    """The scheduler's split forward_backwards (mixed into `Scheduler`; worker thread). Needs its
    fleet, futures, _cond, _splits, _drr, max_step_tokens, stats, _fleet_beside_decodes and
    _fwdbwd_result."""

    def _needs_split(self, op) -> bool:
        return op.kind == "fwdbwd" and self.max_step_tokens > 0 and len(op.examples) > 1 \
            and self._price(op) > self.max_step_tokens

    def _start_split(self, op) -> None:
        """Validate the whole batch, then queue its pieces (its model stays busy until the end)."""
        loss_fn, cfg_items, forward_only = op.group
        try:
            from ..engine.losses import resolve_config

            resolve_config(loss_fn, dict(cfg_items))
            _engine(self.fleet)._check_examples(op.examples, loss_fn, forward_only)
            lengths = [len(e.input_tokens) for e in op.examples]
            budget = getattr(self.fleet, "budget", None)
            if budget is not None:
                budget.check_datums(lengths, forward_only, loss_fn == "dpo")
            ranges = piece_ranges(lengths, self.max_step_tokens, forward_only, loss_fn == "dpo")
        except Exception as e:  # noqa: BLE001 - answered, and its model freed, whatever went wrong
            user = isinstance(e, ValueError)
            self._end_split_locked_free(op, Failure(str(e) if user else f"internal error: {type(e).__name__}: {e}",
                                                    "user" if user else "server"))
            return
        with self._cond:
            self._splits.append(RunningSplit(op, ranges))

    def _end_split_locked_free(self, op, answer) -> None:
        with self._cond:  # the model's next op may go once this one has left
            self._splits = [s for s in self._splits if s.op is not op]
            self._busy_models.discard(op.model_id)
            self._cond.notify_all()
        self.futures.complete(op.rid, answer)

    def _split_affordable(self, s: RunningSplit) -> bool:
        return self._drr.afford(s.op.tenant, s.next_price())

    def _advance_splits(self, idle: bool) -> None:
        """This cycle's pieces, in rounds: each round takes the next piece of every split whose
        tenant's credit pays for it (``idle``: nothing else ran this cycle, so the oldest split's
        piece runs whatever the credit) and runs the pieces of equal loss_fn, config and
        forward_only as ONE mixed call, as ready requests are (several tenants' large requests
        stay batched together)."""
        while not self._stop:
            rounds: dict[tuple, list] = {}
            for s in list(self._splits):
                price = s.next_price()
                if not self._drr.afford(s.op.tenant, price) and not idle:
                    continue
                a, b = s.ranges[s.done]
                piece = dataclasses.replace(s.op, examples=s.op.examples[a:b])
                key = s.op.group if self.cross_model_batching else (s.op.group, s.op.model_id)
                rounds.setdefault(key, []).append((s, piece, price))
                idle = False
            if not rounds:
                return
            ran = False
            for items in rounds.values():
                fleet = self._fleet_beside_decodes([piece for _, piece, _ in items])
                if fleet is None:  # a datum does not fit beside the running decodes: a later cycle
                    continue
                for s, _, price in items:
                    self._drr.charge(s.op.tenant, price)
                self._run_pieces(items, fleet)
                ran = True
            for s in [s for s in list(self._splits) if s.done == len(s.ranges)]:
                self.stats["fwdbwd_ops"] += 1
                self._end_split_locked_free(s.op, self._fwdbwd_result(s.op, _Pieces(s.logprobs, s.losses), 0))
            if not ran:
                return

    def _run_pieces(self, items: list, fleet) -> None:
        """Run one round's pieces of a group as one call (each alone if that fails, so one bad
        piece fails only its own request)."""
        loss_fn, cfg_items, forward_only = items[0][1].group
        try:
            res = fleet.forward_backward([e for _, piece, _ in items for e in piece.examples], loss_fn,
                                         dict(cfg_items), forward_only=forward_only)
        except Exception as e:  # noqa: BLE001 - answered as the uncut call's failure would be
            if len(items) > 1:
                for item in items:
                    self._run_pieces([item], fleet)
                return
            self._fail_split(items[0][0], e)
            return
        off = 0
        for s, piece, _ in items:
            n = len(piece.examples)
            s.logprobs.extend(res.logprobs[off:off + n])
            s.losses.extend(res.losses[off:off + n])
            off += n
            s.done += 1
        self.stats["fwdbwd_calls"] += 1
        self.stats["fwd_pieces"] = self.stats.get("fwd_pieces", 0) + len(items)
        self.stats["max_tenants_per_step"] = max(self.stats["max_tenants_per_step"],
                                                 len({s.op.tenant for s, _, _ in items}))

    def _fail_split(self, s: RunningSplit, e: Exception) -> None:
        user = isinstance(e, ValueError)
        if not user:
            log.error("forward_backward piece failed: %s\n%s", e, traceback.format_exc())
        msg = str(e) if user else f"internal error: {type(e).__name__}: {e}"
        if s.done and not s.op.group[2]:
            adapter = s.op.examples[0].adapter
            try:  # the pieces already applied must not reach the next optim_step
                self.fleet.zero_grad(adapter)
            except Exception as z:  # noqa: BLE001
                log.error("could not drop the gradient of %s: %s", adapter, z)
            msg += f" (after {s.done} of {len(s.ranges)} micro-batches: the model's pending gradient was dropped)"
        self._end_split_locked_free(s.op, Failure(msg, "user" if user else "server"))
