"""`lorafleet serve` on several ranks: ``torchrun --nproc-per-node G -m lorafleet serve ...``.

Rank 0 is the server (HTTP, auth, the store, the scheduler, the job runner: exactly as in one
process). Its fleet is a `BroadcastFleet`: every engine call the service makes is sent to the
other ranks as one small command (method name and arguments, pickled), run on rank 0's fleet,
and then every rank reports how it ended. The other ranks `follow`: receive, run the same call
on their own fleet, report, repeat. So all ranks make the same fleet calls in the same order
(the SPMD contract of `parallelize`), and HTTP answers come from rank 0's call, which under
`FleetComm` already equals what one process returns (results are gathered).

Commands travel on a gloo group of their own (host objects: no device sync; its own timeout).
When no command was sent for a quarter of the timeout, rank 0 sends a keep-alive, so an idle
follower's wait never times out. Failures:

* a ValueError the fleet raises for bad input is raised on every rank alike (the fleet checks
  before any collective): rank 0 answers the client, the followers carry on;
* a dead rank, or ranks that end a call differently (their fleets may no longer be equal),
  lose the engine: rank 0 fails that and every later engine request with the reason
  (`EngineLost`) instead of hanging, and tells live followers to leave (exit 1), after which
  torchrun stops the job; a restarted service recovers from its store and checkpoints.

The launch (rank 0 serving, the others following) is `lorafleet.service.ranks.serve_on_ranks`.

Files: the fleet writes on rank 0 only; a checkpoint being loaded is read by every rank, so with
several nodes ``--data-dir`` must be the same path on a shared filesystem.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .failure import DistributedFailure, guard

log = logging.getLogger("lorafleet.service")

# every rank runs these: they change the fleet or communicate
BROADCAST = frozenset({"add_adapter", "add_adapter_from_weights", "compute_logprobs", "forward", "forward_backward",
                       "get_adapter_weights", "load_adapter", "load_state", "optim_step", "remove_adapter",
                       "reset_optimizer", "sample", "save_adapter", "save_state", "set_adapter_weights",
                       "set_optimizer", "zero_grad"})
# rank 0 answers these alone: reads of state that every rank holds alike
LOCAL = frozenset({"expert_paths", "experts_arch", "pending_adapters", "slot_of", "target_paths", "vocab_sizes"})
SETATTR = "__setattr__"


class EngineLost(RuntimeError):
    """The ranks are no longer in step (one died, or they disagree): no engine call can run."""


class CommandChannel:
    """Rank 0 -> every rank, one pickled command at a time; every rank -> rank 0, its outcome."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def broadcast(self, command=None):
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, outcome) -> list | None:
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(outcome, parts, dst=0, group=self.group)
        return parts


class BroadcastFleet:
    """Rank 0's fleet in a distributed server: each engine call runs on every rank (see module doc).

    Methods in `BROADCAST` are sent, `LOCAL` ones and attributes are read here; any other method
    is refused, so an engine call added to the service must be classified before it can desync."""

    def __init__(self, fleet, channel: CommandChannel, keepalive_s: float | None = None):
        vars(self).update(_fleet=fleet, _channel=channel, _lock=threading.Lock(), _lost=None,
                          _closed=threading.Event(), _last_sent=time.monotonic())
        period = keepalive_s or max(1.0, channel.timeout_s / 4)
        threading.Thread(target=self._keepalive, args=(period,), name="lorafleet-keepalive", daemon=True).start()

    def __getattr__(self, name):  # only for names not set on the proxy itself
        if name.startswith("_"):
            raise AttributeError(name)
        fleet = vars(self)["_fleet"]
        on_class = getattr(type(fleet), name, None)
        if not callable(on_class):  # properties and plain attributes (spec, tokenizer, adapters, ...)
            return getattr(fleet, name)
        if name in BROADCAST:
            return functools.partial(self._run, name)
        if name in LOCAL:
            return getattr(fleet, name)
        raise AttributeError(f"Fleet.{name} is not classified for a distributed server: add it to BROADCAST (it "
                             "changes the fleet or communicates) or LOCAL (a read) in lorafleet/distributed/serve.py")

    def __setattr__(self, name, value):
        self._run(SETATTR, name, value)

    def _run(self, name: str, *args, **kwargs):
        with self._lock:
            if self._lost is not None:
                raise EngineLost(self._lost)
            self._send(("call", name, _to_wire(args), _to_wire(kwargs)))
            try:
                result, error = invoke(self._fleet, name, args, kwargs), None
            except Exception as e:  # noqa: BLE001 - reported by every rank first, raised below
                result, error = None, e
            self._agree(name, error)
            if error is not None:
                raise error
            return result

    def _send(self, command) -> None:
        try:
            with guard(f"sending {command[1] or command[0]} to the other ranks", self._channel.timeout_s):
                self._channel.broadcast(command)
        except DistributedFailure as e:
            self._lose(str(e), tell_followers=False)
        vars(self)["_last_sent"] = time.monotonic()

    def _agree(self, name: str, error: Exception | None) -> None:
        """Every rank's outcome must be rank 0's: anything else means their fleets may differ."""
        mine = outcome(error)
        try:
            with guard(f"{name} (collecting every rank's outcome)", self._channel.timeout_s):
                outcomes = self._channel.gather(mine)
        except DistributedFailure as e:
            self._lose(str(e), tell_followers=False)
        others = {r: o for r, o in enumerate(outcomes) if o != mine}
        if isinstance(error, DistributedFailure):  # a collective inside the call failed: the group is unusable
            self._lose(str(error), tell_followers=True)
        if others:
            said = "; ".join(f"rank {r}: {describe(o)}" for r, o in others.items())
            self._lose(f"the ranks ended {name} differently (rank 0: {describe(mine)}; {said}), so their fleets "
                       "may differ", tell_followers=True)

    def _lose(self, reason: str, tell_followers: bool):
        reason = f"the distributed engine is lost: {reason}; restart the service (it recovers from its store)"
        vars(self)["_lost"] = reason
        log.error("lorafleet serve: %s", reason)
        if tell_followers:
            try:
                self._channel.broadcast(("leave", reason, (), {}))
            except Exception:  # noqa: BLE001 - best effort: torchrun stops them anyway
                pass
        raise EngineLost(reason)

    def _keepalive(self, period: float) -> None:
        while not self._closed.wait(period / 4):
            with self._lock:
                if self._lost is not None or self._closed.is_set():
                    return
                if time.monotonic() - self._last_sent >= period:
                    try:
                        self._send(("ping", None, (), {}))
                    except EngineLost:
                        return

    def shutdown(self) -> bool:
        """Release the followers (once the service makes no more engine calls); whether they heard."""
        self._closed.set()
        with self._lock:
            if self._lost is not None:
                return False
            try:
                self._send(("shutdown", None, (), {}))
            except EngineLost:
                return False
            vars(self)["_lost"] = "the service is shutting down"
            return True


def follow(fleet, channel: CommandChannel) -> int:
    """A follower rank: run rank 0's commands on ``fleet`` until it says stop; the exit code."""
    device = fleet.lora_device
    while True:
        with guard("waiting for rank 0's next command", channel.timeout_s):
            kind, name, args, kwargs = channel.broadcast()
        if kind == "ping":
            continue
        if kind == "shutdown":
            return 0
        if kind == "leave":
            print(f"lorafleet serve: rank {channel.rank} leaves: {name}", flush=True)
            return 1
        try:
            invoke(fleet, name, _from_wire(args, device), _from_wire(kwargs, device))
            error = None
        except Exception as e:  # noqa: BLE001 - rank 0 raised the same (or it decides the engine is lost)
            error = e
        with guard(f"{name} (reporting this rank's outcome)", channel.timeout_s):
            channel.gather(outcome(error))
        if isinstance(error, DistributedFailure):
            raise error
        if error is not None and not isinstance(error, ValueError):
            log.warning("rank %d: %s failed: %s: %s", channel.rank, name, type(error).__name__, error)


def invoke(fleet, name: str, args, kwargs):
    if name == SETATTR:
        return setattr(fleet, *args)
    return getattr(fleet, name)(*args, **kwargs)


def outcome(error: Exception | None):
    """What every rank compares: None, or the error's type and message."""
    return None if error is None else (type(error).__name__, str(error))


def describe(o) -> str:
    return "ok" if o is None else f"{o[0]}: {o[1]}"


class _WireTensor:
    """A tensor argument travels on the host; it is put back on the follower's own device."""

    def __init__(self, t: torch.Tensor):
        self.cpu, self.on_device = t.detach().cpu(), t.device.type != "cpu"

    def restore(self, device):
        return self.cpu.to(device) if self.on_device else self.cpu


def _map_tensors(v, fn, kind=torch.Tensor):
    """``fn`` applied to every ``kind`` inside nested tuples, lists and dicts."""
    if isinstance(v, kind):
        return fn(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_map_tensors(x, fn, kind) for x in v)
    if isinstance(v, dict):
        return {k: _map_tensors(x, fn, kind) for k, x in v.items()}
    return v


def _to_wire(v):
    return _map_tensors(v, _WireTensor)


def _from_wire(v, device):
    return _map_tensors(v, lambda w: w.restore(device), _WireTensor)
