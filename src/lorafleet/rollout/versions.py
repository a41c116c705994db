"""Versioned adapter names in a rollout engine (``name@vN``), for asynchronous rollouts.

While the trainer pushes version N+1 of an adapter, a rollout thread may still be sampling with
version N. Unloading N and loading N+1 under the same name would pull the adapter from under
those requests (Miles #2780: unload→load of a name in use deadlocks the engine). So each push
loads a fresh name ``name@v{version}``, new requests get that name, and an older version is
unloaded only once the last request using it has released it (reference counts around every
generate: :meth:`AdapterVersions.use`).

``max_versions`` K: the newest K versions of each adapter stay loaded; a push needs room for one
more, so the engine must hold K+1 adapters per name at once (vLLM ``--max-loras``, SGLang
``--max-loras-per-batch``). If K older versions are all still in use, a push waits for one to be
released (at most ``wait_s``), then fails with a RolloutError naming them. K=1 on an engine that
replaces an adapter in place (vLLM ``load_inplace``) keeps the plain name and never unloads.

Pure bookkeeping: the engine is reached only through the injected ``load(engine_name, payload,
replace)`` and ``unload(engine_name)`` callables, which are never called with the lock held (a
slow HTTP load does not stall the rollout threads' acquire / release).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .base import RolloutError

VERSION_SEP = "@v"


def versioned_name(name: str, version: int) -> str:
    return f"{name}{VERSION_SEP}{version}"


def slots_needed(max_versions: int, in_place: bool) -> int:
    """Adapters of one name the engine must hold at once: K kept plus the one being loaded
    (only 1 when K=1 and the engine replaces in place)."""
    return 1 if (max_versions == 1 and in_place) else max_versions + 1


def check_max_versions(max_versions, *, in_place: bool, engine_max_loras: int | None = None,
                       limit_flag: str = "--max-loras", what: str = "max_versions") -> int:
    """``max_versions`` as an int >= 1, and (when the engine's limit is known) enough engine
    slots for it; ValueError naming the field otherwise."""
    if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
        raise ValueError(f"{what} must be an integer >= 1 (1 = replace in place), got {max_versions!r}")
    need = slots_needed(max_versions, in_place)
    if engine_max_loras is not None and engine_max_loras < need:
        raise ValueError(
            f"{what}={max_versions} keeps {max_versions} version(s) of an adapter loaded while the next one "
            f"loads: the engine needs {limit_flag} >= {need}, it was started with {limit_flag} {engine_max_loras}")
    return max_versions


@dataclass
class _Adapter:
    current: str | None = None  # the engine name new requests get
    loaded: list[str] = field(default_factory=list)  # engine names loaded, oldest first (incl. current)
    pushing: bool = False


class AdapterVersions:
    """Which engine name serves each adapter, how many requests use each, and when an old
    version may be unloaded. Thread-safe: a rollout thread acquires / releases while the
    trainer pushes."""

    def __init__(self, load: Callable[[str, object, bool], None], unload: Callable[[str], None], *,
                 max_versions: int = 1, in_place: bool = False, wait_s: float = 300.0):
        self.max_versions = check_max_versions(max_versions, in_place=in_place)
        self.in_place = in_place and max_versions == 1  # K > 1 always needs distinct names
        self._load, self._unload, self.wait_s = load, unload, wait_s
        self._cond = threading.Condition()
        self._adapters: dict[str, _Adapter] = {}
        self._refs: dict[str, int] = {}  # engine name -> requests using it now
        self._retired: set[str] = set()  # no longer served: unload once its refs reach 0
        self._unloading: set[str] = set()
        self._unload_failed: dict[str, str] = {}  # engine name -> the engine's answer

    # ------------------------------------------------------------------ the trainer's side
    def push(self, name: str, version: int, payload) -> str:
        """Load ``payload`` (what the sink's load takes: a directory, a snapshot) as version
        ``version`` of adapter ``name``; returns the engine name new requests will use."""
        with self._cond:
            st = self._adapters.setdefault(name, _Adapter())
            while st.pushing:  # one push per adapter at a time
                self._cond.wait()
            st.pushing = True
        try:
            return self._push(name, st, version, payload)
        finally:
            with self._cond:
                st.pushing = False
                self._cond.notify_all()

    def _push(self, name: str, st: _Adapter, version: int, payload) -> str:
        if self.in_place:
            self._load(name, payload, name in st.loaded)
            with self._cond:
                st.current, st.loaded = name, [name]
            return name
        self._retry_failed_unloads(st)
        target = versioned_name(name, version)
        with self._cond:
            if st.current == target:
                return target  # this version is what the engine serves already
        self._make_room(name, st, target)
        self._load(target, payload, False)
        with self._cond:
            st.loaded.append(target)
            st.current = target
            kept = st.loaded[-self.max_versions:]
            self._retired.update(n for n in st.loaded if n not in kept)
            free = self._claim_unloadable(st)
        self._unload_names(st, free)
        return target

    def _make_room(self, name: str, st: _Adapter, target: str) -> None:
        """Wait until loading ``target`` keeps at most K+1 versions of ``name`` loaded (and an
        older copy of ``target`` itself is unloaded: a name is never loaded twice)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with self._cond:
                if target in st.loaded:
                    self._retired.add(target)
                others = [n for n in st.loaded if n != target]
                if target not in st.loaded and len(others) <= self.max_versions:
                    return
                free = self._claim_unloadable(st)
                if not free:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        busy = {n: self._refs.get(n, 0) for n in st.loaded if self._refs.get(n, 0)}
                        raise RolloutError(
                            f"adapter {name!r}: cannot load {target}: {len(st.loaded)} version(s) still loaded and "
                            f"in use by in-flight requests after {self.wait_s:g} s ({busy}); max_versions="
                            f"{self.max_versions}")
                    self._cond.wait(min(left, 1.0))
                    continue
            self._unload_names(st, free)

    def _claim_unloadable(self, st: _Adapter) -> list[str]:
        """Retired names of ``st`` no request uses, marked as being unloaded (lock held)."""
        free = [n for n in st.loaded if n in self._retired and not self._refs.get(n) and n not in self._unloading]
        self._unloading.update(free)
        return free

    def _unload_names(self, st: _Adapter, names: list[str]) -> None:
        for n in names:
            try:
                self._unload(n)
                err = None
            except Exception as e:  # noqa: BLE001 - kept and retried at the next push
                err = " ".join(str(e).split()) or type(e).__name__
            with self._cond:
                self._unloading.discard(n)
                if err is None:
                    st.loaded.remove(n)
                    self._retired.discard(n)
                    self._unload_failed.pop(n, None)
                    self._refs.pop(n, None)
                else:
                    self._unload_failed[n] = err
                self._cond.notify_all()

    def _retry_failed_unloads(self, st: _Adapter) -> None:
        with self._cond:
            names = [n for n in st.loaded if n in self._unload_failed and not self._refs.get(n)
                     and n not in self._unloading]
            self._unloading.update(names)
        self._unload_names(st, names)
        with self._cond:
            still = {n: self._unload_failed[n] for n in names if n in self._unload_failed}
        if still:
            n, err = next(iter(still.items()))
            raise RolloutError(f"unload of old adapter version {n} failed again: {err}")

    # --------------------------------------------------------------- the rollouts' side
    def acquire(self, name: str) -> str:
        """The engine name to sample ``name`` with; it stays loaded until :meth:`release`."""
        with self._cond:
            st = self._adapters.get(name)
            if st is None or st.current is None:
                raise ValueError(f"adapter {name!r} was never pushed to the rollout engine")
            self._refs[st.current] = self._refs.get(st.current, 0) + 1
            return st.current

    def release(self, engine_name: str) -> None:
        """One request using ``engine_name`` is done; the last one out of a retired version
        unloads it (an unload error is kept for the next push, never raised over a result)."""
        with self._cond:
            left = self._refs.get(engine_name, 0) - 1
            if left < 0:
                raise ValueError(f"release of {engine_name!r}, which no request holds")
            self._refs[engine_name] = left
            st = self._owner(engine_name)
            free = self._claim_unloadable(st) if (left == 0 and st is not None) else []
            self._cond.notify_all()
        if free:
            self._unload_names(st, free)

    @contextmanager
    def use(self, name: str) -> Iterator[str]:
        """``with versions.use(name) as engine_name:`` around one request to the engine."""
        engine_name = self.acquire(name)
        try:
            yield engine_name
        finally:
            self.release(engine_name)

    def retire_all(self) -> None:
        """Stop serving every adapter (an engine closing): each version is unloaded now, or by
        the release of the last request still using it."""
        with self._cond:
            for st in self._adapters.values():
                st.current = None
                self._retired.update(st.loaded)
            claims = [(st, self._claim_unloadable(st)) for st in self._adapters.values()]
        for st, names in claims:
            self._unload_names(st, names)

    # ------------------------------------------------------------------------- queries
    def current(self, name: str) -> str | None:
        with self._cond:
            st = self._adapters.get(name)
            return st.current if st else None

    def loaded(self, name: str | None = None) -> list[str]:
        """Engine names loaded now (of one adapter, or all), oldest first."""
        with self._cond:
            if name is None:
                return [n for st in self._adapters.values() for n in st.loaded]
            st = self._adapters.get(name)
            return list(st.loaded) if st else []

    def in_use(self, engine_name: str) -> int:
        with self._cond:
            return self._refs.get(engine_name, 0)

    def _owner(self, engine_name: str) -> _Adapter | None:
        return next((st for st in self._adapters.values() if engine_name in st.loaded), None)
