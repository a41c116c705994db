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
* sampling requests of all samplers run in shared ``fleet.sample`` calls per identical
  sampling parameters (a request with a fixed seed and temperature > 0 runs on its own, so
  its samples do not depend on what else was queued).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ..engine import OptimConfig, SampleRequest, SamplingParams
from ..types import Example
from . import protocol
from .futures import Failure, FutureStore, Result

log = logging.getLogger("lorafleet.service")


class UserError(ValueError):
    """Reported to the client as a failed future with category "user"."""


class PoolFull(UserError):
    """Every slot holds a training model, a job or a sampler that is needed now."""


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


class Scheduler:
    def __init__(self, fleet, futures: FutureStore, *, batch_window_s: float = 0.005,
                 gap_timeout_s: float = 30.0, max_sampler_slots: int | None = None, cross_model_batching: bool = True,
                 slot_wait_s: float = 60.0):
        self.fleet = fleet
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
                      "sample_ops": 0, "max_adapters_per_sample": 0}

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
        """Operations waiting (not yet taken by the worker)."""
        with self._cond:
            return len(self._free_ops) + len(self._slot_wait) + sum(sum(1 for o in q.ops.values() if o is not None)
                                             for q in self._models.values())

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
    def _ready_locked(self):
        """Take every ready op: free ops, and per model the run of ops at the head of its queue
        (a run = consecutive fwdbwd ops of one group, or one control op)."""
        ready: list[Op] = list(self._free_ops)
        self._free_ops.clear()
        now = time.monotonic()
        for q in self._models.values():
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
            head = q.ops.pop(q.next_seq)
            q.next_seq += 1
            ready.append(head)
            if head.kind == "fwdbwd":
                while q.next_seq in q.ops and q.ops[q.next_seq] is not None \
                        and q.ops[q.next_seq].kind == "fwdbwd" and q.ops[q.next_seq].group == head.group:
                    ready.append(q.ops.pop(q.next_seq))
                    q.next_seq += 1
        if self._slot_wait and (ready or now - self._slot_retry >= 0.2):
            ready[:0], self._slot_wait = self._slot_wait, []  # retry them: a slot may have been freed
            self._slot_retry = now
        return ready

    def _has_ready_locked(self) -> bool:
        if self._free_ops:
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
            if self.batch_window_s:
                time.sleep(self.batch_window_s)  # let requests sent together arrive together
            with self._cond:
                ready = [] if self._paused else self._ready_locked()
            if not ready:
                time.sleep(0.05)
                continue
            self.cycle_started = time.monotonic()
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
        return {"alive": self._thread is not None and self._thread.is_alive(),
                "heartbeat_age_s": round(now - self.heartbeat, 3),
                "cycle_s": None if started is None else round(now - started, 3), "queued": self.queued()}

    def _cycle(self, ready: list[Op]):
        control = [o for o in ready if o.kind == "control"]
        fwd = [o for o in ready if o.kind == "fwdbwd"]
        samples = [o for o in ready if o.kind == "sample"]
        for op in control:
            self._run_one(op, lambda op=op: op.fn(self.fleet))
        groups: dict[tuple, list[Op]] = {}
        for op in fwd:
            groups.setdefault(op.group if self.cross_model_batching else (op.group, op.model_id), []).append(op)
        for ops in groups.values():
            self._run_fwdbwd(ops[0].group, ops)
        if samples:
            self._run_samples(samples)

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
    def _run_fwdbwd(self, group: tuple, ops: list[Op]):
        loss_fn, cfg_items, forward_only = group
        examples = [e for op in ops for e in op.examples]
        try:
            res = self.fleet.forward_backward(examples, loss_fn, dict(cfg_items), forward_only=forward_only)
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: run each alone
            if len(ops) == 1:
                user = isinstance(e, ValueError)
                if not user:
                    log.error("forward_backward failed: %s\n%s", e, traceback.format_exc())
                msg = str(e) if user else f"internal error: {type(e).__name__}: {e}"
                self.futures.complete(ops[0].rid, Failure(msg, "user" if user else "server"))
                return
            for op in ops:
                self._run_fwdbwd(group, [op])
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

    def make_room(self, keep: set[str] = frozenset()) -> None:
        """Free a slot if the pool is full by evicting least recently used sampler weights
        (reloaded on demand); PoolFull if every slot holds a training model or a needed sampler."""
        fleet = self.fleet
        while len(fleet.adapters) >= fleet.max_adapters:
            victim = next((a for a in self._sampler_lru if a not in keep), None)
            if victim is None:
                raise PoolFull(f"all {fleet.max_adapters} adapter slots are in use; close some training "
                                "clients (their sessions) or samplers and retry")
            fleet.remove_adapter(victim)
            del self._sampler_lru[victim]

    def has_room(self) -> bool:
        """Whether `make_room` can free a slot now (read from any thread: a hint, not a promise)."""
        return len(self.fleet.adapters) < self.fleet.max_adapters or bool(self._sampler_lru)

    def drop_sampler_adapter(self, adapter: str):
        self._sampler_loaders.pop(adapter, None)
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
        # prompt logprobs: one forward-only pass over every request that asked for them
        plp: dict[str, list] = {}
        want = [op for op in live if op.sample["prompt_logprobs"] and len(op.sample["prompt"]) >= 2]
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
                live = [op for op in live if op not in want]
        for op in live:
            if op.sample["prompt_logprobs"] and op.rid not in plp:
                plp[op.rid] = [None] * len(op.sample["prompt"])
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
                continue
            self.stats["sample_calls"] += 1
            self.stats["sample_ops"] += len(ops_)
            self.stats["max_adapters_per_sample"] = max(self.stats["max_adapters_per_sample"],
                                                        len({op.sample["adapter"] for op in ops_}))
            for op, out in zip(ops_, outs):
                self.futures.complete(op.rid, self._sample_result(out, plp.get(op.rid)))

    @staticmethod
    def _sample_result(seqs, prompt_logprobs) -> Result:
        return Result(body=protocol.encode_sample_response(seqs, prompt_logprobs),
                      content_type=protocol.PROTO_CONTENT_TYPE)


def optim_config(adam: dict) -> OptimConfig:
    clip = float(adam.get("grad_clip_norm") or 0.0)
    return OptimConfig(lr=float(adam.get("learning_rate", 1e-4)),
                       betas=(float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95))),
                       eps=float(adam.get("eps", 1e-12)), weight_decay=float(adam.get("weight_decay", 0.0)),
                       grad_clip_norm=clip if clip > 0 else None)

