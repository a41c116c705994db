"""The scheduler's sampling side: sampler weights in slots, and sample batches run either to the
end in one ``fleet.sample`` or as decodes in flight, a piece per cycle (`Scheduler` mixes this in;
it runs on the scheduler's worker thread)."""

from __future__ import annotations

import logging
import random
import time
import traceback
from typing import TYPE_CHECKING

from ..engine import SampleRequest, SamplingParams
from ..types import Example
from . import protocol
from .fairness import RunningDecode, plan_pieces
from .futures import Failure, Result

if TYPE_CHECKING:
    from .scheduler import Op

log = logging.getLogger("lorafleet.service")


class UserError(ValueError):
    """Reported to the client as a failed future with category "user"."""


class PoolFull(UserError):
    """Every slot holds a training model, a job or a sampler that is needed now."""


class SampleRunning:
    """Needs the `Scheduler`'s fleet, futures, _cond, _decodes, _mem_wait, _slot_wait,
    _sampler_lru, _sampler_loaders, _drop_after_decode, _sampling_tenants, _drr,
    fwd_waits_for_memory, stats and settings. A decode's held memory is its whole
    ``sample_bytes`` estimate (prefill included): conservative, it only limits concurrency."""

    # ------------------------------------------------------------------ sampling
    def ensure_sampler_adapter(self, adapter: str, keep: set[str]) -> None:
        """Load a sampler's weights into a slot (evicting least recently used sampler adapters
        not needed now when the pool is full)."""
        fleet = self.fleet
        if adapter in fleet.adapters:
            self._sampler_lru.move_to_end(adapter, last=True)
            return
        loader = self._sampler_loaders.get(adapter)
        if loader is None:
            raise UserError(f"sampler weights {adapter!r} are gone")
        self.make_room(keep)
        loader(fleet, adapter)
        self._sampler_lru[adapter] = None

    def _decoding_adapters(self) -> set[str]:
        return {a for d in list(self._decodes) for a in d.adapters}

    def make_room(self, keep: set[str] = frozenset()) -> None:
        """Free a slot if the pool is full by evicting least recently used sampler weights
        (reloaded on demand); PoolFull if every slot holds a training model or a needed sampler.
        The weights of a running decode are never evicted: its rows read their slots at every piece."""
        fleet = self.fleet
        keep = set(keep) | self._decoding_adapters()
        while len(fleet.adapters) >= fleet.max_adapters:
            victim = next((a for a in self._sampler_lru if a not in keep), None)
            if victim is None:
                raise PoolFull(f"all {fleet.max_adapters} adapter slots are in use; close some training "
                                "clients (their sessions) or samplers and retry")
            fleet.remove_adapter(victim)
            del self._sampler_lru[victim]

    def has_room(self) -> bool:
        """Whether `make_room` can free a slot now (read from any thread: a hint, not a promise)."""
        return len(self.fleet.adapters) < self.fleet.max_adapters or bool(set(self._sampler_lru) - self._decoding_adapters())

    def drop_sampler_adapter(self, adapter: str):
        self._sampler_loaders.pop(adapter, None)
        if adapter in self._decoding_adapters():  # removed once the decodes reading it finish
            self._drop_after_decode.add(adapter)
            return
        if adapter in self._sampler_lru:
            del self._sampler_lru[adapter]
            if adapter in self.fleet.adapters:
                self.fleet.remove_adapter(adapter)

    def _run_samples(self, ops: list[Op]):
        keep = {op.sample["adapter"] for op in ops if op.sample["adapter"] is not None}
        live = []
        for op in ops:
            a = op.sample["adapter"]
            try:
                if a is not None:
                    self.ensure_sampler_adapter(a, keep)
                live.append(op)
            except PoolFull:
                waited = time.monotonic() - op.t
                if waited < self.slot_wait_s:
                    with self._cond:
                        self._slot_wait.append(op)  # wait for a slot (a session closing, a job ending)
                else:
                    self.futures.complete(op.rid, Failure(
                        f"waited {waited:.0f} s (the server's --slot-wait-s) for a free adapter slot to load "
                        f"sampler weights into: all {self.fleet.max_adapters} slots are held by training clients "
                        "or jobs; close some training clients (their sessions) and retry", "user"))
            except Exception as e:  # noqa: BLE001
                self.futures.complete(op.rid, Failure(str(e), "user"))
        self._sampling_tenants = {op.tenant for op in live}  # who wants decode memory this cycle
        batches: dict[tuple, list[Op]] = {}
        for op in live:
            p: SamplingParams = op.sample["params"]
            key = (p.max_tokens, p.temperature, p.top_p, p.top_k, tuple(map(repr, p.stop or [])), p.stop_on_eos, p.seed)
            if p.seed is not None and p.temperature > 0:
                key = key + (op.rid,)  # a seeded request runs alone: reproducible whatever is queued
            elif not self.cross_model_batching:
                key = key + (op.sample["adapter"],)
            batches.setdefault(key, []).append(op)
        for ops_ in batches.values():
            params = ops_[0].sample["params"]
            if params.seed is None and params.temperature > 0:
                params = SamplingParams(**{**params.__dict__, "seed": random.getrandbits(62)})
            if self._chunked():
                self._start_decodes(ops_, params)
                continue
            ops_, plp = self._prompt_logprobs(ops_)
            if ops_:
                self._sample_to_end(ops_, params, plp)

    def _prompt_logprobs(self, ops: list[Op]) -> tuple[list[Op], dict[str, list]]:
        """One forward-only pass over the requests that asked for prompt logprobs: (the requests
        still alive, rid -> logprobs); if the pass fails, those requests fail."""
        plp: dict[str, list] = {}
        want = [op for op in ops if op.sample["prompt_logprobs"] and len(op.sample["prompt"]) >= 2]
        if want:
            exs = [Example(op.sample["adapter"], op.sample["prompt"][:-1], op.sample["prompt"][1:]) for op in want]
            try:
                res = self.fleet.forward_backward(exs, "cross_entropy", None, forward_only=True)
                for op, lp in zip(want, res.logprobs):
                    vals = [None] + list(lp)
                    last_n = op.sample.get("prompt_logprobs_last_n")
                    if last_n:
                        vals = [None] * (len(vals) - last_n) + vals[-last_n:]
                    plp[op.rid] = vals
            except Exception as e:  # noqa: BLE001
                for op in want:
                    self.futures.complete(op.rid, Failure(f"prompt logprobs failed: {e}", "server"))
                ops = [op for op in ops if op not in want]
        for op in ops:
            if op.sample["prompt_logprobs"] and op.rid not in plp:
                plp[op.rid] = [None] * len(op.sample["prompt"])
        return ops, plp

    def _sample_to_end(self, ops_: list[Op], params: SamplingParams, plp: dict):
        """The uncut path (``decode_chunk_tokens`` 0, or a distributed fleet): one ``fleet.sample``."""
        reqs = [SampleRequest(op.sample["adapter"], op.sample["prompt"], op.sample["num_samples"]) for op in ops_]
        try:
            outs = self.fleet.sample(reqs, params)
        except Exception as e:  # noqa: BLE001
            if len(ops_) > 1:
                for op in ops_:  # isolate the failing request
                    try:
                        out = self.fleet.sample([SampleRequest(op.sample["adapter"], op.sample["prompt"],
                                                               op.sample["num_samples"])], params)[0]
                        self.futures.complete(op.rid, self._sample_result(out, plp.get(op.rid)))
                    except Exception as e2:  # noqa: BLE001
                        self.futures.complete(op.rid, Failure(str(e2), "user"))
            else:
                self.futures.complete(ops_[0].rid, Failure(str(e), "user"))
            return
        self._count_sample(ops_)
        for op, out in zip(ops_, outs):
            self.futures.complete(op.rid, self._sample_result(out, plp.get(op.rid)))

    def _count_sample(self, ops_: list[Op]):
        self.stats["sample_calls"] += 1
        self.stats["sample_ops"] += len(ops_)
        self.stats["max_adapters_per_sample"] = max(self.stats["max_adapters_per_sample"],
                                                    len({op.sample["adapter"] for op in ops_}))

    # ------------------------------------------------------------------ decodes in flight
    def _budget_groups(self, ops_: list[Op], params: SamplingParams) -> list[tuple[list[Op], SamplingParams, int]]:
        """(requests, params, estimated bytes) per decode batch: `BudgetedFleet.sample`'s cut of
        a batch into groups that each fit one step's memory budget, with its per-group seeds."""
        budget = getattr(self.fleet, "budget", None)

        def need(g):
            if budget is None:
                return 0
            return budget.sample_bytes(sum(o.sample["num_samples"] for o in g),
                                       max(len(o.sample["prompt"]) for o in g), params.max_tokens)

        groups, cur = [], []
        for op in ops_:
            if cur and budget is not None and need(cur + [op]) > budget.work:
                groups.append(cur)
                cur = []
            cur = cur + [op]
        groups.append(cur)
        out = []
        for k, g in enumerate(groups):
            p = params if params.seed is None or k == 0 else \
                SamplingParams(**{**params.__dict__, "seed": (params.seed + 104729 * k) % (2**63)})
            out.append((g, p, need(g)))
        return out

    def _memory_waits(self, group: list[Op], need: int, budget) -> bool:
        """Whether a new decode batch must wait for running decodes to free memory: it does not fit
        beside them, a forward_backward waits for them, or one of its tenants already holds a
        running decode and would pass its share of the budget (the budget over the tenants that
        want decode memory), so a flooding tenant's decodes cannot fill the memory others need."""
        if not self._decodes or budget is None:
            return False  # one decode always may run: it was checked alone at the door
        if sum(d.bytes for d in self._decodes) + need > budget.work or self.fwd_waits_for_memory:
            return True
        wanting = {t for d in self._decodes for t in d.tenants} | self._sampling_tenants
        share = budget.work / max(1, len(wanting))
        for t in {op.tenant for op in group}:
            mine = sum(d.bytes for d in self._decodes if t in d.tenants)
            if mine and mine + need > share:
                return True
        return False

    def _start_decodes(self, ops_: list[Op], params: SamplingParams):
        """Start the batch's decodes; a group that must wait for memory (`_memory_waits`) is
        retried next cycle."""
        budget = getattr(self.fleet, "budget", None)
        for group, p, need in self._budget_groups(ops_, params):
            if self._memory_waits(group, need, budget):
                with self._cond:
                    self._mem_wait.extend(group)
                continue
            group, plp = self._prompt_logprobs(group)
            if not group:
                continue
            reqs = [SampleRequest(op.sample["adapter"], op.sample["prompt"], op.sample["num_samples"]) for op in group]
            try:
                state = self.fleet.start_sample(reqs, p)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                if len(group) > 1:
                    for op in group:
                        self._start_decodes([op], p)
                    continue
                self.futures.complete(group[0].rid, Failure(str(e), "user"))
                continue
            self._count_sample(group)
            with self._cond:
                self._decodes.append(RunningDecode(state, group, plp, need))

    def _advance_decodes(self):
        """This cycle's pieces of the running decodes (each tenant's credit pays for its rows);
        finished decodes answer their requests and leave."""
        if not self._decodes:
            return
        pieces = plan_pieces(list(self._decodes), self._drr, self.decode_chunk_tokens)
        # the least work left first: a small request started this cycle answers before the big pieces run
        pieces.sort(key=lambda p: p[0].tokens_left())
        for d, steps in pieces:
            if self._stop:
                break  # shutting down: the rest stays unfinished (journaled lost: 410, retryable)
            try:
                d.state.advance(steps)
                self.stats["decode_pieces"] += 1
                if not d.state.done:
                    continue
                outs = self.fleet.sample_results(d.state)
                answers = [self._sample_result(out, d.prompt_logprobs.get(op.rid)) for op, out in zip(d.ops, outs)]
            except Exception as e:  # noqa: BLE001 - one failing decode must not stop the others
                log.error("decode failed: %s\n%s", e, traceback.format_exc())
                answers = [Failure(f"internal error: {type(e).__name__}: {e}", "server")] * len(d.ops)
            with self._cond:  # left the queue before its requests answer (a client may read the depth then)
                self._decodes.remove(d)
            for op, answer in zip(d.ops, answers):
                self.futures.complete(op.rid, answer)
        for a in list(self._drop_after_decode):
            if a not in self._decoding_adapters():
                self._drop_after_decode.discard(a)
                self.drop_sampler_adapter(a)

    @staticmethod
    def _sample_result(seqs, prompt_logprobs) -> Result:
        return Result(body=protocol.encode_sample_response(seqs, prompt_logprobs),
                      content_type=protocol.PROTO_CONTENT_TYPE)
