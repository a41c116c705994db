"""`BudgetedFleet`: the service's fleet, with every engine call kept inside the memory budget.

The scheduler batches every ready request of every tenant into one ``forward_backward`` (and one
``sample`` per sampling parameters), so what one call holds depends on what others sent. This
proxy cuts a call that would exceed the `MemoryBudget` into consecutive pieces that each fit:

* ``forward_backward``: micro-batches of whole datums (DPO pairs together). Exact: losses are
  per-example sums and each adapter's gradients accumulate across calls until its optim_step,
  so the pieces' gradients add up to the whole batch's (fp32 rounding aside) and the results
  are the pieces' results concatenated, metrics summed. The whole batch is validated first, so
  a bad datum in a later piece never leaves an earlier piece's gradients behind.
* ``sample``: groups of whole requests; a request alone was checked at the door.

Everything else (attributes, other methods) is the fleet's own.
"""

from __future__ import annotations

from ..engine.training import ForwardBackwardResult
from .budget import MemoryBudget


def _engine(fleet):
    """The `Fleet` under any proxies (a distributed server's BroadcastFleet holds it as ``_fleet``)."""
    while "_fleet" in vars(fleet):
        fleet = vars(fleet)["_fleet"]
    return fleet


class BudgetedFleet:
    def __init__(self, fleet, budget: MemoryBudget):
        vars(self).update(_fleet=fleet, budget=budget, pieces=0)

    def __getattr__(self, name):  # only for names not set on the proxy itself
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(vars(self)["_fleet"], name)

    def __setattr__(self, name, value):
        setattr(vars(self)["_fleet"], name, value)

    def forward_backward(self, examples, loss_fn: str = "cross_entropy", loss_fn_config: dict | None = None,
                         forward_only: bool = False):
        fleet = vars(self)["_fleet"]
        if not isinstance(examples, list) or not all(hasattr(e, "input_tokens") for e in examples):
            return fleet.forward_backward(examples, loss_fn, loss_fn_config, forward_only=forward_only)  # its error
        lengths = [len(e.input_tokens) for e in examples]
        ranges = self.budget.micro_batches(lengths, forward_only, loss_fn == "dpo")
        if len(ranges) == 1:
            return fleet.forward_backward(examples, loss_fn, loss_fn_config, forward_only=forward_only)
        from ..engine.losses import resolve_config

        resolve_config(loss_fn, loss_fn_config)
        _engine(fleet)._check_examples(examples, loss_fn, forward_only)  # all of it, before any piece runs
        for a, b in ranges:  # a piece of one datum (pair) that still does not fit: refused, not run
            self.budget.check_datums(lengths[a:b], forward_only, loss_fn == "dpo")
        parts = [fleet.forward_backward(examples[a:b], loss_fn, loss_fn_config, forward_only=forward_only)
                 for a, b in ranges]
        vars(self)["pieces"] += len(parts)
        losses = [x for p in parts for x in p.losses]
        # the fleet's own per-adapter sums over the whole batch, in example order (as uncut, and
        # as the distributed gather does), not a re-summing of the pieces' sums
        metrics = _engine(fleet)._metrics(examples, losses, forward_only)
        return ForwardBackwardResult(logprobs=[x for p in parts for x in p.logprobs], losses=losses,
                                     entropy=[x for p in parts for x in p.entropy], metrics=metrics)

    def sample(self, requests, params=None):
        fleet = vars(self)["_fleet"]
        if not isinstance(requests, list) or len(requests) < 2 or params is None \
                or not all(hasattr(r, "prompt_tokens") for r in requests):
            return fleet.sample(requests, params)
        groups, cur = [], []
        for r in requests:
            trial = cur + [r]
            need = self.budget.sample_bytes(sum(x.num_samples for x in trial),
                                            max(len(x.prompt_tokens) for x in trial), params.max_tokens)
            if cur and need > self.budget.work:
                groups.append(cur)
                trial = [r]
            cur = trial
        groups.append(cur)
        if len(groups) == 1:
            return fleet.sample(requests, params)
        from dataclasses import replace

        out = []
        for k, g in enumerate(groups):
            # an unseeded batch got one random seed from the scheduler; the groups must not repeat
            # each other's draws (row seeds derive from the seed and the row's place in its call)
            p = params if params.seed is None or k == 0 else replace(params, seed=(params.seed + 104729 * k) % (2**63))
            out.extend(fleet.sample(g, p))
        vars(self)["pieces"] += len(groups)
        return out
