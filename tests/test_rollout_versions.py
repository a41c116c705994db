"""Versioned adapter names (rollout/versions.py) against a fake engine that checks the two rules:
a name is never loaded while loaded (no unload→load of a name in use), and never unloaded while a
request uses it."""

import random
import threading
import time

import pytest

from lorafleet.rollout import RolloutError
from lorafleet.rollout.versions import AdapterVersions, check_max_versions, versioned_name


class FakeEngine:
    """Loads / unloads names; `using` is counted by the test's own requests, independently of
    AdapterVersions' reference counts."""

    def __init__(self, load_s=0.0):
        self.loaded: dict[str, object] = {}
        self.using: dict[str, int] = {}
        self.events: list[tuple] = []
        self.errors: list[str] = []
        self.max_loaded_per_adapter = 0
        self.load_s = load_s
        self.fail_unload = 0
        self.lock = threading.Lock()

    def load(self, engine_name, payload, replace):
        if self.load_s:
            time.sleep(self.load_s)
        with self.lock:
            if engine_name in self.loaded and not replace:
                self.errors.append(f"load of {engine_name} while loaded")
            self.loaded[engine_name] = payload
            self.events.append(("load", engine_name, replace))
            per = {}
            for n in self.loaded:
                per[n.split("@")[0]] = per.get(n.split("@")[0], 0) + 1
            self.max_loaded_per_adapter = max(self.max_loaded_per_adapter, *per.values())

    def unload(self, engine_name):
        with self.lock:
            if self.fail_unload:
                self.fail_unload -= 1
                raise RuntimeError("HTTP 500: engine busy")
            if engine_name not in self.loaded:
                self.errors.append(f"unload of {engine_name}, not loaded")
            if self.using.get(engine_name, 0):
                self.errors.append(f"unload of {engine_name} while {self.using[engine_name]} request(s) use it")
            self.loaded.pop(engine_name, None)
            self.events.append(("unload", engine_name))

    def request(self, engine_name):
        with self.lock:
            if engine_name not in self.loaded:
                self.errors.append(f"request on {engine_name}, not loaded")
            self.using[engine_name] = self.using.get(engine_name, 0) + 1

    def done(self, engine_name):
        with self.lock:
            self.using[engine_name] -= 1


def test_k1_versioned_replaces_after_the_last_request():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=1)
    assert v.push("a", 0, "w0") == "a@v0"
    held = v.acquire("a")
    eng.request(held)
    assert v.push("a", 1, "w1") == "a@v1"  # the old version stays while a request uses it
    assert eng.loaded.keys() == {"a@v0", "a@v1"} and v.acquire("a") == "a@v1"
    v.release("a@v1")
    eng.done(held)
    v.release(held)  # the last request out unloads it
    assert eng.loaded.keys() == {"a@v1"} and v.loaded("a") == ["a@v1"]
    assert eng.errors == []


def test_k1_in_place_keeps_the_plain_name_and_never_unloads():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=1, in_place=True)
    for step in range(3):
        assert v.push("a", step, f"w{step}") == "a"
        assert v.acquire("a") == "a"  # held across the next push: in place, nothing to wait for
    assert [e for e in eng.events] == [("load", "a", False), ("load", "a", True), ("load", "a", True)]
    assert eng.loaded == {"a": "w2"}


def test_k2_keeps_two_versions_and_a_repush_is_a_no_op():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=2, in_place=True)  # K > 1: names even in place
    for step in range(4):
        v.push("a", step, step)
    assert v.loaded("a") == ["a@v2", "a@v3"] and set(eng.loaded) == {"a@v2", "a@v3"}
    n_events = len(eng.events)
    assert v.push("a", 3, 3) == "a@v3" and len(eng.events) == n_events


def test_push_waits_for_room_then_names_the_versions_in_use():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=1, wait_s=0.3)
    v.push("a", 0, 0)
    h0 = v.acquire("a")
    v.push("a", 1, 1)
    h1 = v.acquire("a")  # v0 and v1 both in use: loading v2 would need a third slot
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=r"cannot load a@v2: 2 version\(s\) still loaded and in use by in-flight "
                                           r"requests after 0.3 s \({'a@v0': 1, 'a@v1': 1}\); max_versions=1"):
        v.push("a", 2, 2)
    assert time.monotonic() - t0 >= 0.3
    # a release during the wait lets the push through
    threading.Timer(0.1, v.release, args=(h0,)).start()
    v.wait_s = 5
    assert v.push("a", 2, 2) == "a@v2"
    assert set(eng.loaded) == {"a@v1", "a@v2"}
    v.release(h1)
    assert set(eng.loaded) == {"a@v2"} and eng.errors == []


def test_a_version_pushed_again_while_an_older_copy_is_held_waits_and_never_double_loads():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=2, wait_s=2)
    v.push("a", 0, "old")
    h = v.acquire("a")
    v.push("a", 1, 1)
    threading.Timer(0.1, v.release, args=(h,)).start()
    assert v.push("a", 0, "new") == "a@v0"  # an adapter recreated: its version 0 again
    assert eng.loaded["a@v0"] == "new" and eng.errors == []


def test_failed_unload_is_kept_then_retried_and_reported_at_the_next_push():
    eng = FakeEngine()
    v = AdapterVersions(eng.load, eng.unload, max_versions=1)
    v.push("a", 0, 0)
    h = v.acquire("a")
    v.push("a", 1, 1)
    eng.fail_unload = 1
    v.release(h)  # the unload fails: not raised over the request's result
    assert "a@v0" in eng.loaded
    v.push("a", 2, 2)  # retried first, succeeds
    assert set(eng.loaded) == {"a@v2"}
    h = v.acquire("a")
    v.push("a", 3, 3)
    eng.fail_unload = 2
    v.release(h)
    with pytest.raises(RolloutError, match="unload of old adapter version a@v2 failed again: HTTP 500"):
        v.push("a", 4, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_versions must be an integer >= 1"):
        AdapterVersions(print, print, max_versions=0)
    with pytest.raises(ValueError, match=r"needs --max-loras >= 3, it was started with --max-loras 2"):
        check_max_versions(2, in_place=True, engine_max_loras=2)
    assert check_max_versions(1, in_place=True, engine_max_loras=1) == 1
    with pytest.raises(ValueError, match=r"--max-loras-per-batch >= 2"):
        check_max_versions(1, in_place=False, engine_max_loras=1, limit_flag="--max-loras-per-batch")
    v = AdapterVersions(print, print)
    with pytest.raises(ValueError, match="never pushed"):
        v.acquire("a")
    with pytest.raises(ValueError, match="no request holds"):
        v.release("a@v0")


@pytest.mark.parametrize("k", [1, 2])
def test_concurrent_rollout_threads_and_a_pusher(k):
    """Four rollout threads acquire / sample / release while the trainer pushes 30 versions of two
    adapters (loads take time): no name is loaded twice or unloaded in use, at most K+1 versions
    of an adapter are ever loaded, and the end state holds exactly the newest K."""
    eng = FakeEngine(load_s=0.001)
    v = AdapterVersions(eng.load, eng.unload, max_versions=k, wait_s=30)
    for a in ("a", "b"):
        v.push(a, 0, 0)
    stop = threading.Event()
    seen = {"a": set(), "b": set()}

    def rollouts(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            a = rng.choice("ab")
            with v.use(a) as name:
                eng.request(name)
                seen[a].add(name)
                time.sleep(rng.random() * 0.002)
                eng.done(name)

    threads = [threading.Thread(target=rollouts, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for step in range(1, 31):
            for a in ("a", "b"):
                assert v.push(a, step, step) == versioned_name(a, step)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert eng.errors == []
    assert eng.max_loaded_per_adapter <= k + 1
    for a in ("a", "b"):
        assert v.loaded(a) == [versioned_name(a, s) for s in range(31 - k, 31)]
        assert len(seen[a]) > 1  # the threads did sample across versions
    assert sorted(eng.loaded) == sorted(v.loaded())
    v.retire_all()
    assert eng.loaded == {} and eng.errors == []
