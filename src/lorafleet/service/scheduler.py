"""One worker thread owns the `Fleet`; every engine call happens there.

HTTP handlers `submit` operations. Operations of a training model carry the SDK's ``seq_id``
and run strictly in that order (a model's queue only releases its next ``seq_id``; a gap left
by a request the server rejected is skipped with `skip`, and a gap nobody fills is jumped after
``gap_timeout_s``). Each cycle the worker takes every ready operation of every tenant:

* control operations (create / optim_step / save / load / finish ...) run one by one;
* ``forward_backward`` / ``forward`` operations that are ready at the same time — across models
  and tenants — run as ONE mixed ``fleet.forward_backward`` call per (loss_fn, config,
  forward_only) group, and the results are split back per request. Consecutive chunks of one
  model are merged the same way (gradients accumulate, losses are sums, so this is exact);
* sampling requests of all samplers start in shared decode batches per identical sampling
  parameters (a request with a fixed seed and temperature > 0 runs on its own, so its samples
  do not depend on what else was queued). A batch stays in flight across cycles and decodes at
  most ``decode_chunk_tokens`` steps per cycle (0: to the end at once, the old behaviour);
* a ``forward_backward`` / ``forward`` priced over ``max_step_tokens`` is cut into micro-batches
  of whole datums run in successive cycles, its model's later operations waiting (fb_pieces.py).

What each tenant gets per cycle is a fair share by deficit round-robin priced in tokens
(fairness.py): one tenant's huge sample or flood of requests cannot hold up another's small one.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ..engine import OptimConfig
from ..types import Example
from . import protocol
from .budget_fleet import BudgetedFleet
from .fairness import DeficitRoundRobin, RunningDecode, op_price
from .fb_pieces import RunningSplit, SplitRunning
from .futures import Failure, FutureStore, Result
from .samples import PoolFull, SampleRunning, UserError  # noqa: F401 - imported from here by core.py, jobs.py

log = logging.getLogger("lorafleet.service")


@dataclass
class Op:
    rid: str
    tenant: str
    kind: str  # "fwdbwd" | "control" | "sample"
    fn: Callable | None = None  # control: fn(fleet) -> Result
    model_id: str | None = None
    seq_id: int | None = None
    # fwdbwd
    examples: list[Example] | None = None
    group: tuple | None = None
    raw: bool = False  # result as JSON metrics, not the protocol's protobuf (the service's jobs)
    # sample
    sample: dict | None = None
    t: float = field(default_factory=time.monotonic)


class _ModelQueue:
    def __init__(self, first_seq: int = 1):
        self.next_seq = first_seq
        self.ops: dict[int, Op | None] = {}  # seq_id -> op (None: skipped)
        self.blocked_since: float | None = None


class Scheduler(SampleRunning, SplitRunning):
    def __init__(self, fleet, futures: FutureStore, *, batch_window_s: float = 0.005,
                 gap_timeout_s: float = 30.0, max_sampler_slots: int | None = None, cross_model_batching: bool = True,
                 slot_wait_s: float = 60.0, decode_chunk_tokens: int = 32, fair_share_tokens: int = 4096,
                 max_step_tokens: int | None = None):
        self.fleet = fleet
        if max_step_tokens is None or max_step_tokens == -1:
            max_step_tokens = fair_share_tokens  # a piece fits one fair share
        if isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int) or max_step_tokens < 0:
            raise ValueError(f"max_step_tokens must be an integer >= 0 (0: no splitting, -1: the fair share), "
                             f"got {max_step_tokens!r}")
        # a forward_backward priced over this runs as micro-batches in successive cycles (0: in one)
        self.max_step_tokens = max_step_tokens
        self._splits: list[RunningSplit] = []  # split forward_backwards in flight, oldest first
        self._busy_models: set[str] = set()  # models whose split request runs: their next ops wait
        if not isinstance(decode_chunk_tokens, int) or decode_chunk_tokens < 0:
            raise ValueError(f"decode_chunk_tokens must be an integer >= 0 (0: no chunking), got {decode_chunk_tokens!r}")
        # a running decode takes at most this many steps per cycle, then others' work runs (0: a
        # sample decodes to its end in one call, the pre-issue-14 behaviour; a distributed fleet
        # always does, its ranks decode in lockstep through fleet.sample)
        self.decode_chunk_tokens = decode_chunk_tokens
        self._drr = DeficitRoundRobin(fair_share_tokens)
        # a distributed server's ranks decode in lockstep inside fleet.sample: no resumable decodes there
        self._resumable = hasattr(fleet, "start_sample") and getattr(fleet, "comm", None) is None
        self._decodes: list[RunningDecode] = []  # in flight, oldest first (worker thread; mutated under _cond)
        self._mem_wait: list[Op] = []  # samples whose decode batch waits for running ones to free memory
        self._drop_after_decode: set[str] = set()  # sampler weights dropped while a decode still reads them
        self._fwd_blocked: set[str] = set()  # forward_backward requests that did not fit beside the decodes
        self._sampling_tenants: set[str] = set()  # tenants whose samples this cycle starts or retries
        # a sample whose sampler weights find every slot held waits this long for one, then fails
        self.slot_wait_s = slot_wait_s
        self._slot_wait: list[Op] = []  # those samples, oldest first; retried every cycle
        self.heartbeat = time.monotonic()  # the worker's last sign of life (healthz)
        self.cycle_started: float | None = None  # when the running cycle began (None: idle)
        # False: one model per forward_backward and one adapter per sampling call (time-sharing,
        # as Twinkle does) — kept only so bench/bench_service.py can show what batching buys
        self.cross_model_batching = cross_model_batching
        self.futures = futures
        self.batch_window_s = batch_window_s
        self.gap_timeout_s = gap_timeout_s
        self._cond = threading.Condition()
        self._models: dict[str, _ModelQueue] = {}
        self._free_ops: list[Op] = []  # no ordering constraint (sampling, model creation)
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._sampler_lru: OrderedDict[str, None] = OrderedDict()  # fleet adapter names of samplers
        self._sampler_loaders: dict[str, Callable] = {}
        self._slot_retry = 0.0
        self.stats = {"fwdbwd_calls": 0, "fwdbwd_ops": 0, "max_tenants_per_step": 0, "sample_calls": 0,
                      "sample_ops": 0, "max_adapters_per_sample": 0, "cycles": 0, "decode_pieces": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        self._thread = threading.Thread(target=self._run, name="lorafleet-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until nothing is queued or running; whether that happened."""
        deadline = time.monotonic() + timeout
        while self.queued() or self.cycle_started is not None:
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.05)
        return True

    def pause(self):
        """Stop taking new work (the running cycle finishes); requests keep queueing."""
        with self._cond:
            self._paused = True

    def resume(self):
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def queued(self) -> int:
        """Operations not finished: waiting to be taken, waiting for a slot or memory, or decoding."""
        with self._cond:
            return len(self._free_ops) + len(self._slot_wait) + len(self._mem_wait) + self._decoding_locked() \
                + len(self._busy_models) \
                + sum(sum(1 for o in q.ops.values() if o is not None) for q in self._models.values())

    def _decoding_locked(self) -> int:
        return sum(len(d.ops) for d in self._decodes)

    # ------------------------------------------------------------------ submission
    def open_model(self, model_id: str, first_seq: int = 1):
        with self._cond:
            self._models.setdefault(model_id, _ModelQueue(first_seq))

    def close_model(self, model_id: str):
        with self._cond:
            q = self._models.pop(model_id, None)
        if q is not None:
            for op in q.ops.values():
                if op is not None:
                    self.futures.complete(op.rid, Failure(f"model {model_id} was closed", "user"))

    def check_seq(self, model_id: str, seq_id: int) -> None:
        """UserError if ``seq_id`` was already used or is queued (checked before submitting)."""
        with self._cond:
            q = self._models.get(model_id)
            if q is None:
                raise UserError(f"model {model_id!r} is not open")
            if seq_id < q.next_seq or seq_id in q.ops:
                raise UserError(f"seq_id {seq_id} of model {model_id} was already used (next expected "
                                f"{q.next_seq})")

    def submit(self, op: Op) -> None:
        with self._cond:
            if op.model_id is not None and op.seq_id is not None:
                q = self._models.get(op.model_id)
                if q is None:
                    raise UserError(f"model {op.model_id!r} is not open")
                if op.seq_id < q.next_seq or op.seq_id in q.ops:
                    raise UserError(f"seq_id {op.seq_id} of model {op.model_id} was already used")
                q.ops[op.seq_id] = op
            else:
                self._free_ops.append(op)
            self._cond.notify_all()

    def skip(self, model_id: str, seq_id: int | None) -> None:
        """A rejected request's seq_id: let the model's later requests go on."""
        if seq_id is None:
            return
        with self._cond:
            q = self._models.get(model_id)
            if q is not None and seq_id >= q.next_seq and seq_id not in q.ops:
                q.ops[seq_id] = None
                self._cond.notify_all()

    def register_sampler_loader(self, adapter: str, loader: Callable) -> None:
        with self._cond:
            self._sampler_loaders[adapter] = loader

    # ------------------------------------------------------------------ worker
    def _heads_locked(self, now: float) -> list[tuple[Op, _ModelQueue | None]]:
        """Every takeable op, oldest first: free ops (queue None) and each model's next op
        (after skipped seq_ids; a gap nobody fills is jumped after ``gap_timeout_s``)."""
        heads: list[tuple[Op, _ModelQueue | None]] = [(op, None) for op in self._free_ops]
        for model_id, q in self._models.items():
            if model_id in self._busy_models:  # its split request runs: sequential per model
                continue
            while q.next_seq in q.ops and q.ops[q.next_seq] is None:  # skipped seq_ids
                del q.ops[q.next_seq]
                q.next_seq += 1
            if q.ops and q.next_seq not in q.ops:  # a gap: wait for it, then jump it
                if q.blocked_since is None:
                    q.blocked_since = now
                elif now - q.blocked_since > self.gap_timeout_s:
                    log.warning("seq_id %d never arrived; skipping to %d", q.next_seq, min(q.ops))
                    q.next_seq = min(q.ops)
            if q.next_seq not in q.ops:
                continue
            q.blocked_since = None
            heads.append((q.ops[q.next_seq], q))
        heads.sort(key=lambda h: h[0].t)
        return heads

    def _take_locked(self, heads) -> list[Op]:
        """The ops each tenant's credit pays for, oldest first per tenant: a free op, or a model's
        next op and (fwdbwd) the run of its following ops of the same group. A tenant stops at its
        first op it cannot pay for, so its big request is not overtaken by its own later ones."""
        taken: list[Op] = []
        stopped: set[str] = set()
        for op, q in heads:
            if op.model_id in self._busy_models and q is not None:
                continue  # split this cycle, below
            split = q is not None and self._needs_split(op)
            if op.tenant in stopped or (not split and not self._drr.afford(op.tenant, self._price(op))):
                stopped.add(op.tenant)
                continue
            taken.append(op)
            if q is None:
                self._drr.charge(op.tenant, self._price(op))
                continue
            del q.ops[q.next_seq]
            q.next_seq += 1
            if split:  # its pieces pay as they run; its model's next ops wait for its end
                self._busy_models.add(op.model_id)
                continue
            self._drr.charge(op.tenant, self._price(op))
            while op.kind == "fwdbwd" and q.ops.get(q.next_seq) is not None and q.ops[q.next_seq].kind == "fwdbwd" \
                    and q.ops[q.next_seq].group == op.group and self._drr.afford(op.tenant, self._price(q.ops[q.next_seq])):
                self._drr.charge(op.tenant, self._price(q.ops[q.next_seq]))
                taken.append(q.ops.pop(q.next_seq))
                q.next_seq += 1
        if taken:
            ids = {id(o) for o in taken}
            self._free_ops = [o for o in self._free_ops if id(o) not in ids]
        return taken

    def _price(self, op: Op) -> int:
        return op_price(op, whole_decode=not self._chunked())

    def _chunked(self) -> bool:
        return self.decode_chunk_tokens > 0 and self._resumable

    def _ready_locked(self):
        """A new cycle: grant every tenant with work its fair share, take what the shares pay for
        (all at once when nothing else could run: the empty rounds are skipped), and retry the
        samples waiting for a slot or for memory."""
        now = time.monotonic()
        heads = self._heads_locked(now)
        active = {op.tenant for op, _ in heads} | {t for d in self._decodes for t in d.tenants} \
            | {s.op.tenant for s in self._splits}
        self._drr.grant(active)
        ready = self._take_locked(heads)
        if not ready and heads and not any(self._piece_affordable(d) for d in self._decodes) \
                and not any(self._split_affordable(s) for s in self._splits):
            wants: dict[str, float] = {}
            for s in self._splits:
                wants.setdefault(s.op.tenant, s.next_price())
            for op, _ in heads:
                wants.setdefault(op.tenant, self._price(op))  # each tenant's oldest op
            self._drr.fast_forward(wants)
            ready = self._take_locked(self._heads_locked(now))
        if self._mem_wait:
            ready[:0], self._mem_wait = self._mem_wait, []  # their batches may fit now
        if self._slot_wait and (ready or now - self._slot_retry >= 0.2):
            ready[:0], self._slot_wait = self._slot_wait, []  # retry them: a slot may have been freed
            self._slot_retry = now
        return ready

    def _piece_affordable(self, d: RunningDecode) -> bool:
        shares = d.step_shares()
        return bool(shares) and all(self._drr.afford(t, s) for t, s in shares.items())

    def _has_ready_locked(self) -> bool:
        if self._free_ops or self._decodes or self._mem_wait or self._splits:
            return True
        return any(q.next_seq in q.ops or (q.ops and q.blocked_since is not None) for q in self._models.values())

    def _run(self):
        while True:
            with self._cond:
                self.heartbeat = time.monotonic()
                while not self._stop and (self._paused or not self._has_ready_locked()):
                    self._cond.wait(timeout=0.2 if self._slot_wait else 1.0)
                    self.heartbeat = time.monotonic()
                    if not self._paused and (self._slot_wait or any(q.ops for q in self._models.values())):
                        break  # re-check gaps and samples waiting for a slot
                if self._stop:
                    return
                decoding = bool(self._decodes) or bool(self._splits)
            if self.batch_window_s and not decoding:
                time.sleep(self.batch_window_s)  # let requests sent together arrive together
            with self._cond:
                ready = [] if self._paused else self._ready_locked()
                decoding = (bool(self._decodes) or bool(self._splits)) and not self._paused
            if not ready and not decoding:
                time.sleep(0.05)
                continue
            self.cycle_started = time.monotonic()
            self.stats["cycles"] += 1
            try:
                self._cycle(ready)
            except Exception as e:  # noqa: BLE001 - never let the worker die
                log.error("scheduler cycle failed: %s\n%s", e, traceback.format_exc())
                for op in ready:
                    self.futures.complete(op.rid, Failure(f"internal error: {e}", "server"))
            finally:
                self.cycle_started = None
                self.heartbeat = time.monotonic()

    def liveness(self) -> dict:
        """For healthz: whether the worker thread runs, seconds since its last sign of life and
        how long the running cycle has taken so far (from any thread)."""
        now, started = time.monotonic(), self.cycle_started
        with self._cond:
            decoding = self._decoding_locked()
        return {"alive": self._thread is not None and self._thread.is_alive(),
                "heartbeat_age_s": round(now - self.heartbeat, 3),
                "cycle_s": None if started is None else round(now - started, 3), "queued": self.queued(),
                "decoding": decoding}

    def _cycle(self, ready: list[Op]):
        control = [o for o in ready if o.kind == "control"]
        fwd = [o for o in ready if o.kind == "fwdbwd" and o.model_id not in self._busy_models]
        for op in ready:
            if op.kind == "fwdbwd" and op.model_id in self._busy_models:
                self._start_split(op)
        samples = [o for o in ready if o.kind == "sample"]
        for op in control:
            self._run_one(op, lambda op=op: op.fn(self.fleet))
        groups: dict[tuple, list[Op]] = {}
        for op in fwd:
            groups.setdefault(op.group if self.cross_model_batching else (op.group, op.model_id), []).append(op)
        for ops in groups.values():
            fleet = self._fleet_beside_decodes(ops)
            if fleet is None:
                self._requeue(ops)
                continue
            self._run_fwdbwd(ops[0].group, ops, fleet)
        if not self._decodes:
            self._fwd_blocked.clear()
        if samples:
            self._run_samples(samples)
        # nothing else ran: a piece runs whatever its tenant's credit (as fast_forward would)
        idle = not ready and not any(self._piece_affordable(d) for d in self._decodes)
        self._advance_splits(idle)
        self._advance_decodes()

    def _run_one(self, op: Op, fn):
        try:
            out = fn()
            self.futures.complete(op.rid, out if isinstance(out, (Result, Failure)) else Result(json=out))
        except (UserError, ValueError, protocol.ProtocolError) as e:
            self.futures.complete(op.rid, Failure(str(e), "user"))
        except Exception as e:  # noqa: BLE001
            log.error("request %s failed: %s\n%s", op.rid, e, traceback.format_exc())
            self.futures.complete(op.rid, Failure(f"internal error: {type(e).__name__}: {e}", "server"))

    # ------------------------------------------------------------------ training
    def _fleet_beside_decodes(self, ops: list[Op]):
        """The fleet a forward_backward runs on while decodes hold KV caches: its micro-batches are
        cut to the memory budget less what the decodes hold. None when one of its datums (DPO pairs)
        cannot fit beside them: it waits, and no new decode starts until it ran."""
        held = sum(d.bytes for d in self._decodes)
        budget = getattr(self.fleet, "budget", None)
        if not held or budget is None:
            return self.fleet
        view = copy.copy(budget)
        view.work = budget.work - held
        loss_fn, _, forward_only = ops[0].group
        dpo, step = loss_fn == "dpo", 2 if loss_fn == "dpo" else 1
        for op in ops:
            lengths = [len(e.input_tokens) for e in op.examples]
            if any(view.train_bytes(lengths[i:i + step], forward_only, dpo) > view.work
                   for i in range(0, len(lengths), step)):
                self._fwd_blocked.update(o.rid for o in ops)
                return None
        self._fwd_blocked.difference_update(o.rid for o in ops)
        return BudgetedFleet(vars(self.fleet)["_fleet"], view)

    @property
    def fwd_waits_for_memory(self) -> bool:
        """A forward_backward waits for running decodes to free memory: no new decode starts."""
        return bool(self._fwd_blocked)

    def _requeue(self, ops: list[Op]) -> None:
        """Put taken ops back at the head of their models' queues, their price refunded."""
        with self._cond:
            for op in ops:
                q = self._models.get(op.model_id)
                if q is None:
                    self.futures.complete(op.rid, Failure(f"model {op.model_id} was closed", "user"))
                    continue
                q.ops[op.seq_id] = op
                q.next_seq = min(q.next_seq, op.seq_id)
                self._drr.charge(op.tenant, -self._price(op))

    def _run_fwdbwd(self, group: tuple, ops: list[Op], fleet=None):
        loss_fn, cfg_items, forward_only = group
        examples = [e for op in ops for e in op.examples]
        fleet = self.fleet if fleet is None else fleet
        try:
            res = fleet.forward_backward(examples, loss_fn, dict(cfg_items), forward_only=forward_only)
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: run each alone
            if len(ops) == 1:
                user = isinstance(e, ValueError)
                if not user:
                    log.error("forward_backward failed: %s\n%s", e, traceback.format_exc())
                msg = str(e) if user else f"internal error: {type(e).__name__}: {e}"
                self.futures.complete(ops[0].rid, Failure(msg, "user" if user else "server"))
                return
            for op in ops:
                self._run_fwdbwd(group, [op], fleet)
            return
        self.stats["fwdbwd_calls"] += 1
        self.stats["fwdbwd_ops"] += len(ops)
        self.stats["max_tenants_per_step"] = max(self.stats["max_tenants_per_step"], len({o.tenant for o in ops}))
        off = 0
        for op in ops:
            self.futures.complete(op.rid, self._fwdbwd_result(op, res, off))
            off += len(op.examples)

    @staticmethod
    def _fwdbwd_result(op: Op, res, off: int) -> Result:
        n = len(op.examples)
        lps = res.logprobs[off:off + n]
        losses = res.losses[off:off + n]
        metrics = {"loss:sum": float(sum(losses)),
                   "num_tokens:sum": float(sum(sum(1 for w in e.weights if w != 0) for e in op.examples))}
        if op.raw:
            return Result(json=dict(metrics, input_tokens=sum(len(e.input_tokens) for e in op.examples)))
        return Result(body=protocol.encode_forward_backward_output(lps, metrics),
                      content_type=protocol.PROTO_CONTENT_TYPE)

def optim_config(adam: dict) -> OptimConfig:
    clip = float(adam.get("grad_clip_norm") or 0.0)
    return OptimConfig(lr=float(adam.get("learning_rate", 1e-4)),
                       betas=(float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95))),
                       eps=float(adam.get("eps", 1e-12)), weight_decay=float(adam.get("weight_decay", 0.0)),
                       grad_clip_norm=clip if clip > 0 else None)

