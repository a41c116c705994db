"""Fair scheduling in `lorafleet serve` (issue 14, finding 1): long decodes are cut into pieces.

This part: a resumable decode cut into pieces of any size gives the samples of one
uninterrupted `fleet.sample`, bit for bit, even with other engine work run between pieces."""

from __future__ import annotations

import torch

import lorafleet as lf
from lorafleet.engine import SampleRequest, SamplingParams
from lorafleet.models.debug import build_debug_model


def _fleet():
    fleet = lf.Fleet(build_debug_model("qwen3_moe"), max_adapters=4, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules="all-linear", seed=1))
    with torch.no_grad():  # a non-zero B, so the adapter changes the samples
        for p in fleet.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return fleet


def test_chunked_decode_equals_uninterrupted_sample():
    fleet = _fleet()
    reqs = [SampleRequest("a", [3, 7, 9, 11], 3), SampleRequest(None, [5, 6], 2)]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, stop_on_eos=False)
    ref = fleet.sample(reqs, params)
    for chunk in (1, 5):
        state = fleet.start_sample(reqs, params)
        while not state.done:
            state.advance(chunk)
            # other work between the pieces must not change the samples
            fleet.forward_backward([lf.Example("a", [1, 2, 3], [2, 3, 4])], forward_only=True)
        got = fleet.sample_results(state)
        for r_ref, r_got in zip(ref, got):
            for s_ref, s_got in zip(r_ref, r_got):
                assert s_got.tokens == s_ref.tokens and s_got.logprobs == s_ref.logprobs
                assert s_got.stop_reason == s_ref.stop_reason
    assert len(ref[0][0].tokens) == 12


# ---------------------------------------------------------------------------- the scheduler
# Scheduler + FutureStore on the debug fleet, no HTTP: the worker thread is the service's own.

import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lorafleet.service.futures import FutureStore, Result  # noqa: E402
from lorafleet.service.scheduler import Op, PoolFull, Scheduler  # noqa: E402
from lorafleet.service import protocol  # noqa: E402

T = 60  # seconds: bound on every wait


@pytest.fixture
def sched():
    made = []

    def make(fleet=None, **kw):
        s = Scheduler(fleet or _fleet(), FutureStore(), batch_window_s=0.0, **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _sample(s: Scheduler, tenant, n=1, max_tokens=2, prompt=(3, 7, 9, 11), seed=None, adapter=None, temp=1.0):
    rid = s.futures.create(tenant, "sample", durable=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=temp, seed=seed, stop_on_eos=False)
    s.submit(Op(rid, tenant, "sample", sample={"adapter": adapter, "prompt": list(prompt), "num_samples": n,
                                                 "params": params, "prompt_logprobs": False}))
    return rid


def _wait(cond, what):
    deadline = time.monotonic() + T
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def _steps_done(s: Scheduler) -> int:
    return max((d.state.steps for d in list(s._decodes)), default=0)


def test_small_sample_finishes_while_a_huge_one_runs(sched):
    # the 128 x 4096 of the report, shrunk for CPU: 16 rows x 800 tokens (~3 s alone)
    s = sched(decode_chunk_tokens=16)
    big = _sample(s, "flood", n=16, max_tokens=800)
    _wait(lambda: s.liveness()["decoding"] or s.cycle_started is not None, "the big sample never started")
    time.sleep(0.05)
    t0 = time.monotonic()
    small = _sample(s, "small", max_tokens=2)
    assert isinstance(s.futures.wait_sync(small, T), Result)
    waited = time.monotonic() - t0
    assert s.futures.peek(big) is None, "the small sample waited for the whole big one"
    assert _steps_done(s) < 800 // 4, f"the big one had done {_steps_done(s)} of 800 steps"
    assert waited < 2.0, waited


def test_flooding_tenant_gets_its_share_not_more(sched):
    # one tenant's 20 distinct (seeded) requests, then another tenant's one: served within a few
    # cycles, while most of the flood still waits
    s = sched(decode_chunk_tokens=32, fair_share_tokens=300)
    s.pause()
    flood = [_sample(s, "flood", max_tokens=64, seed=100 + i) for i in range(20)]
    s.resume()
    _wait(lambda: s.stats["cycles"] >= 1, "the flood never started")
    c0 = s.stats["cycles"]
    small = _sample(s, "small", max_tokens=2)
    assert isinstance(s.futures.wait_sync(small, T), Result)
    assert s.stats["cycles"] - c0 <= 3
    pending = sum(s.futures.peek(r) is None for r in flood)
    assert pending >= 15, f"only {pending} of the flood's 20 requests were still waiting"


def test_seeded_samples_do_not_depend_on_chunking_or_other_work(sched):
    fleet = _fleet()
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=77, stop_on_eos=False)
    ref = fleet.sample([SampleRequest(None, [3, 7, 9, 11], 3)], params)[0]
    for chunk in (0, 3):
        s = sched(fleet, decode_chunk_tokens=chunk, fair_share_tokens=64)
        others = [_sample(s, "b", n=2, max_tokens=30) for _ in range(3)]
        rid = s.futures.create("a", "sample", durable=False)
        s.submit(Op(rid, "a", "sample", sample={"adapter": None, "prompt": [3, 7, 9, 11], "num_samples": 3,
                                                "params": params, "prompt_logprobs": False}))
        fwd = []
        for _ in range(4):  # forward passes of another tenant between the pieces
            f = s.futures.create("c", "fwd", durable=False)
            s.submit(Op(f, "c", "fwdbwd", examples=[lf.Example("a", [1, 2, 3], [2, 3, 4])],
                        group=("cross_entropy", (), True), raw=True))
            fwd.append(f)
        got = s.futures.wait_sync(rid, T)
        assert isinstance(got, Result)
        seqs = _decode_samples(got.body)
        assert [q.tokens for q in ref] == [q[0] for q in seqs]
        assert [np.float32(q.logprobs).tolist() for q in ref] == [q[1] for q in seqs]
        for r in others + fwd:
            assert isinstance(s.futures.wait_sync(r, T), Result)
        s.stop()


def _decode_samples(body: bytes):
    """(tokens, float32 logprobs) per sequence of a SampleResponse body."""
    resp = protocol.pb.SampleResponse.FromString(body)
    return [(np.frombuffer(q.tokens, np.int32).tolist(), np.frombuffer(q.logprobs, np.float32).tolist())
            for q in resp.sequences]


def test_running_decodes_count_in_the_queue_and_drain_waits(sched):
    s = sched(decode_chunk_tokens=8)
    big = _sample(s, "t", n=4, max_tokens=300)
    _wait(lambda: s.liveness()["decoding"], "the decode never started")
    assert s.queued() >= 1 and s.liveness()["decoding"] == 1
    assert not s.drain(0.05)  # running: not drained
    assert s.drain(T) and s.queued() == 0
    assert isinstance(s.futures.peek(big), Result)


def test_a_running_decodes_weights_are_never_evicted(sched):
    fleet = lf.Fleet(build_debug_model("qwen3_moe"), max_adapters=2, max_rank=8)
    cfg = lf.AdapterConfig(rank=4, target_modules="all-linear", seed=3)
    fleet.add_adapter("w", cfg)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=5, stop_on_eos=False)
    ref = fleet.sample([SampleRequest("w", [4, 5, 6], 2)], params)[0]
    fleet.remove_adapter("w")
    fleet.add_adapter("t0", lf.AdapterConfig(rank=4, target_modules="all-linear"))  # with "w": the pool is full
    s = sched(fleet, decode_chunk_tokens=4)
    s.register_sampler_loader("w", lambda f, name: f.add_adapter(name, cfg))
    rid = s.futures.create("t", "sample", durable=False)
    s.submit(Op(rid, "t", "sample", sample={"adapter": "w", "prompt": [4, 5, 6], "num_samples": 2,
                                            "params": params, "prompt_logprobs": False}))
    _wait(lambda: s.liveness()["decoding"], "the decode never started")
    outcome = {}

    def fill_the_pool(fleet):  # what create_model does: make room, take a slot
        try:
            s.make_room()
            fleet.add_adapter("train", lf.AdapterConfig(rank=4, target_modules="all-linear"))
            outcome["made_room"] = True
        except PoolFull as e:
            outcome["pool_full"] = str(e)
        return {}

    f = s.futures.create("u", "create", durable=False)
    s.submit(Op(f, "u", "control", fill_the_pool))
    assert isinstance(s.futures.wait_sync(f, T), Result)
    assert "pool_full" in outcome and "w" in fleet.adapters
    got = _decode_samples(s.futures.wait_sync(rid, T).body)
    assert [q.tokens for q in ref] == [q[0] for q in got]


# ---------------------------------------------------------------------------- a real `lorafleet serve`
def test_serve_flags_and_bad_values(capsys):
    from lorafleet.cli import main

    for flag, value in (("--decode-chunk-tokens", "-1"), ("--fair-share-tokens", "0")):
        assert main(["serve", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err, err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--decode-chunk-tokens N" in out and "(default: 32)" in out and "(default: 4096)" in out


@pytest.mark.slow  # ~25-50 s on the shared 2-core box, most of it the server's start
def test_serve_process_small_sample_beside_a_huge_one_then_sigterm(tmp_path):
    import os
    import signal
    import sqlite3
    import subprocess
    import sys

    import httpx

    from lorafleet.service.server import free_port

    keys = {"alice": "tml-alice-0123456789", "bob": "tml-bob-0123456789"}
    port = free_port()
    env = dict(os.environ, LORAFLEET_API_KEYS=",".join(f"{t}:{k}" for t, k in keys.items()), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path), "--base", "debug:qwen3_moe", "--max-rank", "8", "--threads", "1",
                             "--decode-chunk-tokens", "8", "--shutdown-grace-s", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/api/v1"

    def asample(http, key, n, max_tokens):
        r = http.post(f"{url}/asample", headers={"X-API-Key": key}, json={
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 7, 9, 11]}]}, "num_samples": n,
            "sampling_params": {"max_tokens": max_tokens, "stop": [], "temperature": 1.0}})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with httpx.Client(timeout=30) as http:
            big = asample(http, keys["alice"], 16, 4000)  # ~15 s alone on one core
            time.sleep(0.3)
            t0 = time.monotonic()
            small = asample(http, keys["bob"], 1, 2)
            r = http.post(f"{url}/retrieve_future", headers={"X-API-Key": keys["bob"]}, json={"request_id": small})
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-protobuf"), r.text
            assert time.monotonic() - t0 < 5.0
            metrics = [x for x in http.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
                       if x.startswith(("lorafleet_scheduler", "lorafleet_pending"))]
            assert "lorafleet_scheduler_queue_depth 1.0" in metrics, metrics  # the running decode
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the big decode is still running: answered retryably (lost: 410)
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - t1 < 10.0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and "lorafleet serve: stopped" in out, out
    with sqlite3.connect(tmp_path / "lorafleet.db") as db:
        status = dict(db.execute("SELECT id, status FROM requests").fetchall())
    assert status[big] == "lost" and status[small] == "done", status


def test_a_decode_that_does_not_fit_beside_the_running_one_waits_for_it(sched):
    from lorafleet.service.budget import MemoryBudget, ModelShape
    from lorafleet.service.budget_fleet import BudgetedFleet

    fleet = _fleet()
    one = MemoryBudget(ModelShape.of(fleet.model), 0, 0, 0).sample_bytes(4, 4, 60)
    budget = MemoryBudget(ModelShape.of(fleet.model), int(1.5 * one), 0, 0)  # one decode fits, two do not
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, stop_on_eos=False) for s in (1, 2)]
    refs = [fleet.sample([SampleRequest(None, [3, 7, 9, 11], 4)], p)[0] for p in params]
    s = sched(BudgetedFleet(fleet, budget), decode_chunk_tokens=4)
    s.pause()
    rids = [_sample(s, t, n=4, max_tokens=60, seed=p.seed) for t, p in zip("ab", params)]
    s.resume()
    most = 0
    while any(s.futures.peek(r) is None for r in rids):
        most = max(most, len(s._decodes))
        time.sleep(0.001)
    assert most == 1
    for rid, ref in zip(rids, refs):
        assert [q[0] for q in _decode_samples(s.futures.peek(rid).body)] == [q.tokens for q in ref]


def test_a_forward_backward_that_does_not_fit_beside_a_decode_waits_for_it(sched):
    from lorafleet.service.budget import MemoryBudget, ModelShape
    from lorafleet.service.budget_fleet import BudgetedFleet

    fleet = _fleet()
    shape = ModelShape.of(fleet.model)
    est = MemoryBudget(shape, 0, 0, 0)
    decode, datum = est.sample_bytes(4, 4, 150), est.train_bytes([16], forward_only=True)
    assert datum < decode
    budget = MemoryBudget(shape, decode + datum // 2, 0, 0)  # each fits alone, not both at once
    ex = [lf.Example("a", list(range(3, 19)), list(range(4, 20)))]
    s = sched(BudgetedFleet(fleet, budget), decode_chunk_tokens=4)
    s.open_model("m")
    big = _sample(s, "t", n=4, max_tokens=150)
    _wait(lambda: s.liveness()["decoding"], "the decode never started")
    f = s.futures.create("u", "fwd", durable=False)
    s.submit(Op(f, "u", "fwdbwd", model_id="m", seq_id=1, examples=ex, group=("cross_entropy", (), True), raw=True))
    later = _sample(s, "t", n=4, max_tokens=150)  # does not start before the waiting forward ran
    got = s.futures.wait_sync(f, T)
    assert isinstance(got, Result) and isinstance(s.futures.peek(big), Result), "it ran beside the decode"
    assert s.futures.peek(later) is None or s.stats["sample_calls"] == 2
    assert got.json["loss:sum"] == pytest.approx(float(sum(fleet.forward_backward(ex, forward_only=True).losses)),
                                                  rel=1e-5)
    assert isinstance(s.futures.wait_sync(later, T), Result)


def test_a_flooding_tenant_cannot_fill_the_decode_memory(sched):
    from lorafleet.service.budget import MemoryBudget, ModelShape
    from lorafleet.service.budget_fleet import BudgetedFleet

    fleet = _fleet()
    shape = ModelShape.of(fleet.model)
    one = MemoryBudget(shape, 0, 0, 0).sample_bytes(4, 4, 60)
    s = sched(BudgetedFleet(fleet, MemoryBudget(shape, 4 * one + one // 2, 0, 0)), decode_chunk_tokens=4)
    s.pause()
    flood = [_sample(s, "flood", n=4, max_tokens=60, seed=i) for i in range(8)]  # four fit at once, in step
    s.resume()
    _wait(lambda: len(s._decodes) == 4, "the flood's first four never ran")
    # as big as one of the flood's: it starts as soon as memory frees, beside at most the flood's
    # share (half the budget), not after the flood's other four (which took all of it before)
    small = _sample(s, "small", n=4, max_tokens=60, seed=99)
    assert isinstance(s.futures.wait_sync(small, T), Result)
    pending = sum(s.futures.peek(r) is None for r in flood)
    assert pending >= 2, f"the small tenant waited until {8 - pending} of the flood's 8 requests had finished"
