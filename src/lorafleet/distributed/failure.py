"""A rank that dies (or hangs) ends the others with one message naming it, never a silent hang.

gloo notices a killed peer at once ("Connection closed by peer") and a stuck one after the
process group's timeout, but neither says *which rank*. So every rank bumps a counter of its own
in the rendezvous store once a second (`Heartbeat`); when a collective fails, the survivors read
the counters twice a few beats apart: ranks whose counter did not move are dead. Counters, not
timestamps, so clocks of different nodes never matter.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PREFIX = "lorafleet/heartbeat/"


class DistributedFailure(ValueError):
    """A collective failed because another rank died or stopped responding. A ValueError so the
    CLI prints it as one line, like every other job error."""


class Heartbeat:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self.store.add(PREFIX + str(self.rank), 1)
        self._thread = threading.Thread(target=self._beat, name="lorafleet-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(PREFIX + str(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone (its host died): diagnosis says so
                return

    def stop(self):
        self._stop.set()

    def _counters(self) -> dict[int, int | None]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = self.store.add(PREFIX + str(r), 0)  # add 0: read without blocking on a missing key
            except Exception:  # noqa: BLE001
                out[r] = None
        return out

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose heartbeat stopped (None: the store itself is unreachable)."""
        self.store.set_timeout(timedelta(seconds=max(2.0, 2 * self.interval_s)))
        first = self._counters()
        if all(v is None for v in first.values()):
            return None
        time.sleep(3 * self.interval_s)
        second = self._counters()
        return [r for r in range(self.world) if r != self.rank and (second[r] is None or second[r] == first[r])]


_heartbeat: Heartbeat | None = None


def start_heartbeat(interval_s: float = 1.0) -> Heartbeat:
    global _heartbeat
    if _heartbeat is None:
        _heartbeat = Heartbeat(interval_s)
    return _heartbeat


def stop_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        # joined, so no beat is inside a store call while the process group is torn down
        _heartbeat._thread.join(timeout=2 * _heartbeat.interval_s + 1.0)
        _heartbeat = None


def describe_failure(what: str, error: BaseException, timeout_s: float | None = None) -> str:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    world = dist.get_world_size() if dist.is_initialized() else "?"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _heartbeat is None:
        who = "another rank died or stopped responding"
    else:
        silent = _heartbeat.silent_ranks()
        if silent is None:
            who = "the rendezvous store is unreachable: the rank hosting it (rank 0 or the torchrun agent) died"
        elif silent:
            who = f"rank {', '.join(map(str, silent))} died (no heartbeat)"
        else:
            who = "every rank is alive, so one is stuck or issued a different collective"
    limit = f" (timeout {timeout_s:g} s)" if timeout_s else ""
    return f"rank {rank} of {world}: {what} failed{limit}: {who}; the collective said: {first_line}"


@contextlib.contextmanager
def guard(what: str, timeout_s: float | None = None):
    """Turn a failed collective inside the block into one `DistributedFailure` naming the dead rank."""
    try:
        yield
    except DistributedFailure:
        raise
    except (RuntimeError, dist.DistError) as e:
        if not _looks_distributed(e):
            raise
        raise DistributedFailure(describe_failure(what, e, timeout_s)) from e


def _looks_distributed(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset",
                                   "Timed out", "timed out", "ProcessGroup", "c10d", "Broken pipe"))
