"""`lorafleet serve --rollout-url`: the service's sampling served by a rollout engine.

The engine here is an in-process RolloutEngine over a second Fleet on the same base (a copy the
service does not share): a push loads the snapshot's files there, so what it samples proves which
weights were pushed. The service runs under uvicorn in a thread and the official tinker SDK is
the client. The real vLLM version of these checks is at the end (the `vllm_server` fixture).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
import tinker
from tinker import types

from lorafleet.engine import Fleet
from lorafleet.engine.sampling import SampleRequest
from lorafleet.rollout import RolloutError
from lorafleet.service import rollout_sampling
from lorafleet.service.core import ServiceConfig
from lorafleet.service.server import ServerThread, build_service, free_port, load_service_base, make_app
from lorafleet.types import Example

KEY = "tml-alice-0123456789"
T = 60
BASE = "debug:qwen3"  # dense: what vLLM's CPU LoRA can run
REAL_SINK = rollout_sampling.make_service_engine  # the module fixture stands a fake in for it


class FleetEngine:
    """A RolloutEngine over its own Fleet: push writes the snapshot (as a sink does) and loads it."""

    def __init__(self, directory, seed: int = 0):
        from lorafleet.models.debug import build_debug_model

        model, tok, _, _ = load_service_base(BASE, log_fn=lambda *a: None)
        if seed:
            model = build_debug_model("qwen3", seed=seed)
        self.fleet = Fleet(model, max_adapters=16, max_rank=8)
        self.fleet.tokenizer = tok
        self.dir, self.lock = directory, threading.Lock()
        self.pushes, self.unloads, self.generates = [], [], []
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None  # generate waits on it (a request in flight)

    def _maybe_fail(self):
        if self.fail is not None:
            raise self.fail

    def push(self, snap):
        self._maybe_fail()
        d = snap.write(self.dir / snap.name)
        with self.lock:
            if snap.name in self.fleet.adapters:
                self.fleet.remove_adapter(snap.name)
            self.fleet.load_adapter(snap.name, d)
        self.pushes.append((snap.name, snap.layout, snap.rank))
        return snap.name

    def generate(self, adapter, prompts, params, n):
        if self.gate is not None:
            self.gate.wait(T)
        self._maybe_fail()
        self.generates.append(adapter)
        with self.lock:
            return self.fleet.sample([SampleRequest(adapter, p, n) for p in prompts], params)

    def prompt_logprobs(self, adapter, tokens):
        self._maybe_fail()
        with self.lock:
            res = self.fleet.forward_backward([Example(adapter, tokens[:-1], tokens[1:])], "cross_entropy", None,
                                              forward_only=True)
        return [None] + [float(x) for x in res.logprobs[0]]

    def unload(self, name):
        with self.lock:
            self.fleet.remove_adapter(name)
        self.unloads.append(name)

    def close(self):
        pass


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory):
    engine = FleetEngine(tmp_path_factory.mktemp("engine"))
    mp = pytest.MonkeyPatch()
    mp.setattr(rollout_sampling, "make_service_engine", lambda *a: engine)
    mp.setattr(rollout_sampling, "RETRY_AFTER_S", 1.0)
    cfg = ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=8, max_rank=8, long_poll_s=5.0,
                        rollout_url="http://engine.test:8000", rollout_retries=1)
    svc = build_service(BASE, cfg, log_fn=lambda *a: None)
    svc.rollout.retry_wait_s = 0.01
    app, _ = make_app(svc, keys={KEY: "alice"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url, engine
    srv.stop()
    svc.close()
    mp.undo()


def datum(tok, text):
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def trained_client(sc, svc, steps=2):
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=2).result(timeout=T)
    tok = tc.get_tokenizer()
    for _ in range(steps):
        tc.forward_backward([datum(tok, "the cat sat on the mat")], "cross_entropy").result(timeout=T)
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=T)
    return tc, tok


def last_sampler_id(svc) -> str:
    """The sampler id of the weights pushed last (keys are tenant/sampler_id)."""
    return list(svc.rollout.loaded())[-1].split("/", 1)[1]


def own_greedy(svc, adapter, prompt, max_tokens):
    """What the service's own fleet samples for ``adapter`` (the built-in decoder's answer)."""
    from lorafleet.engine import SamplingParams

    done = threading.Event()
    out = {}

    def fn(fleet):  # on the scheduler thread, like every engine call of the service
        out["seq"] = fleet.sample([SampleRequest(adapter, prompt, 1)],
                                  SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_on_eos=False))[0][0]
        done.set()
        return {}

    from lorafleet.service.scheduler import Op

    svc.scheduler.submit(Op(svc.futures.create("alice", "test", durable=False), "alice", "control", fn))
    assert done.wait(T)
    return out["seq"]


def test_samples_go_to_the_engine_with_the_saved_weights(engine_server):
    svc, url, engine = engine_server
    calls = svc.scheduler.stats["sample_calls"]
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = tok.encode("the cat")
        model_id = tc.model_id
        ref = own_greedy(svc, svc.adapter_name("alice", model_id), prompt, 8)
        res = sampler.sample(types.ModelInput.from_ints(prompt), 2,
                             types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result(timeout=T)
        # the SDK's shape: tokens, per-token logprobs, stop reason
        for s in res.sequences:
            assert s.tokens == ref.tokens and s.stop_reason == "length"
            assert s.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        lps = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result(timeout=T)
        assert lps[0] is None and len(lps) == len(prompt)
        # a second save is a new name (a sampler is a frozen copy): the first one keeps its weights
        tc.forward_backward([datum(tok, "zz qq zz qq")], "cross_entropy").result(timeout=T)
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=T)
        sampler2 = tc.save_weights_and_get_sampling_client()
        again = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                               types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result(timeout=T)
        assert again.sequences[0].tokens == ref.tokens
        sampler2.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=4)).result(timeout=T)
        names = list(svc.rollout.loaded().values())
        assert len(names) == 2 and all(n.startswith("lf-") for n in names)
        assert [p[0] for p in engine.pushes[-2:]] == names and all(p[1] == "peft" and p[2] == 4
                                                                  for p in engine.pushes[-2:])
        # the base model is sampled by the engine too
        base = sc.create_sampling_client(base_model=svc.base_name)
        base.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=3)).result(timeout=T)
        assert engine.generates[-1] is None
    # none of it ran on the scheduler (the training thread); closing the session unloads both
    assert svc.scheduler.stats["sample_calls"] == calls
    deadline = time.monotonic() + 10
    while not set(names) <= set(engine.unloads):
        assert time.monotonic() < deadline, (names, engine.unloads)
        time.sleep(0.05)
    assert svc.rollout.loaded() == {}


def test_a_sampler_path_is_pushed_from_its_saved_directory(engine_server):
    svc, url, engine = engine_server
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        path = tc.save_weights_for_sampler("for-engine").result(timeout=T).path
        n = len(engine.pushes)
        s = sc.create_sampling_client(model_path=path)
        prompt = tok.encode("on the")
        ref = own_greedy(svc, svc.adapter_name("alice", tc.model_id), prompt, 6)
        got = s.sample(types.ModelInput.from_ints(prompt), 1,
                       types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result(timeout=T)
        assert got.sequences[0].tokens == ref.tokens
        assert len(engine.pushes) == n + 1


def test_after_a_restart_a_sampler_is_pushed_from_its_saved_directory(tmp_path, monkeypatch):
    """A new server process finds the sampler in its store; the engine (here a fresh one) gets its
    weights from the saved directory at the first request, under the same name, and samples the
    same tokens as before the restart."""
    engines = [FleetEngine(tmp_path / "e1"), FleetEngine(tmp_path / "e2")]
    monkeypatch.setattr(rollout_sampling, "make_service_engine", lambda *a: engines.pop(0))
    cfg = ServiceConfig(data_dir=str(tmp_path / "svc"), max_rank=8, long_poll_s=5.0,
                        rollout_url="http://engine.test:8000")
    svc = build_service(BASE, cfg, log_fn=lambda *a: None)
    first = svc.rollout.engine
    app, _ = make_app(svc, keys={KEY: "alice"})
    with ServerThread(app) as url, tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        path = tc.save_weights_for_sampler("kept").result(timeout=T).path
    # a session left open when the process dies, with a sampler of those weights
    session = svc.create_session("alice", {})["session_id"]
    sid = svc.create_sampling_session("alice", {"session_id": session, "sampling_session_seq_id": 0,
                                                "model_path": path})["sampling_session_id"]
    body = {"sampling_session_id": sid, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": tok.encode("the cat")}]},
            "sampling_params": {"max_tokens": 8, "temperature": 0.0, "stop": []}}
    before = svc.futures.wait_sync(svc.asample("alice", body)["request_id"], T)
    svc.close()
    svc2 = build_service(BASE, cfg, log_fn=lambda *a: None)
    try:
        after = svc2.futures.wait_sync(svc2.asample("alice", body)["request_id"], T)
        assert after.body is not None and after.body == before.body
        second = svc2.rollout.engine
        assert [p[0] for p in second.pushes] == [p[0] for p in first.pushes] and len(second.pushes) == 1
    finally:
        svc2.close()


def test_engine_errors_are_the_engines_answer_and_training_goes_on(engine_server):
    svc, url, engine = engine_server
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(tok.encode("the"))
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)
        engine.fail = RolloutError("HTTP 500 {'error': 'engine is sad'}")
        try:
            with pytest.raises(tinker.RequestFailedError, match=r"rollout engine vllm at http://engine\.test:8000: "
                                                                r"HTTP 500 .*engine is sad"):
                sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)
            # while it fails, new requests are refused at the door: 502 naming its answer (the SDK retries)
            body = {"sampling_session_id": last_sampler_id(svc), "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt.to_ints()}]},
                    "sampling_params": {"max_tokens": 2}}
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=10) as http:
                r = http.post("/api/v1/asample", json=body)
                assert r.status_code == 502 and "engine is sad" in r.json()["error"], r.text
                engine.fail = OSError("[Errno 111] Connection refused")
                time.sleep(1.05)
                assert http.post("/api/v1/asample", json=body).status_code == 200  # let through once...
                deadline = time.monotonic() + 10
                while (r := http.post("/api/v1/asample", json=body)).status_code == 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert r.status_code == 503 and "Connection refused" in r.json()["error"], r.text
            # training is untouched by all of it
            out = tc.forward_backward([datum(tok, "the cat")], "cross_entropy").result(timeout=T)
            assert out.metrics["loss:sum"] > 0
        finally:
            engine.fail = None
        # the engine is back: the SDK's next request meets the 503 at first, retries it, and is served
        assert svc.rollout._failed is not None
        assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T).sequences) == 1
        assert svc.rollout._failed is None


def test_a_closed_session_unloads_only_after_its_requests_finish(engine_server):
    svc, url, engine = engine_server
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(tok.encode("the"))
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)
        name = list(svc.rollout.loaded().values())[-1]
        engine.gate = threading.Event()
        try:
            fut = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2))
            deadline = time.monotonic() + 10
            while not any(p.in_flight for p in svc.rollout._adapters.values()):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # training goes on while the engine holds the request (samples never run on the scheduler)
            tc.forward_backward([datum(tok, "the cat")], "cross_entropy").result(timeout=T)
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=T)
            assert any(p.in_flight for p in svc.rollout._adapters.values())  # still held by the engine
            sid = last_sampler_id(svc)
            session_id = sid.split(":")[0]
            svc.futures.wait_sync(svc.finish_session("alice", session_id), T)
            time.sleep(0.5)  # the session is finished, its request still runs: nothing unloaded
            assert name not in engine.unloads and name not in svc.rollout.loaded().values()
        finally:
            engine.gate.set()
            engine.gate = None
        assert len(fut.result(timeout=T).sequences) == 1
        deadline = time.monotonic() + 10
        while name not in engine.unloads:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a later request for that sampler is the caller's mistake, named; nothing is pushed again
        pushes = len(engine.pushes)
        body = {"sampling_session_id": sid, "num_samples": 1, "sampling_params": {"max_tokens": 2},
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt.to_ints()}]}}
        out = svc.futures.wait_sync(svc.asample("alice", body)["request_id"], T)
        assert out.category == "user" and "session is closed" in out.error and len(engine.pushes) == pushes


def test_sglang_gets_its_own_layout_and_its_options(tmp_path, monkeypatch):
    """With --rollout-engine sglang the snapshot is in SGLang's layout; a sampler of a saved PEFT
    path (no snapshot in that layout) stays with the built-in decoder; the sink gets SGLang's options."""
    import lorafleet.rollout as rollout

    engine, specs = FleetEngine(tmp_path / "e"), []
    monkeypatch.setattr(rollout, "make_engine", lambda spec, **kw: specs.append((spec, kw)) or engine)
    monkeypatch.setattr(rollout_sampling, "make_service_engine", REAL_SINK)  # the module fixture's fake off
    cfg = ServiceConfig(data_dir=str(tmp_path / "svc"), max_rank=8, long_poll_s=5.0, rollout_engine="sglang",
                        rollout_url="http://sglang.test:30000")
    svc = build_service(BASE, cfg, log_fn=lambda *a: None)
    assert specs == [({"engine": "sglang", "url": "http://sglang.test:30000",
                       "adapter_dir": str(tmp_path / "svc" / "rollout_adapters")},
                      {"base_dir": str(tmp_path / "svc" / "rollout_adapters"), "max_rank": 8})]
    app, _ = make_app(svc, keys={KEY: "alice"})
    try:
        with ServerThread(app) as url, tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
            tc, tok = trained_client(sc, svc, steps=1)
            prompt = types.ModelInput.from_ints(tok.encode("the cat"))
            greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
            a = tc.save_weights_and_get_sampling_client().sample(prompt, 1, greedy).result(timeout=T)
            assert [p[1] for p in engine.pushes] == ["sglang"] and engine.generates == [engine.pushes[0][0]]
            calls = svc.scheduler.stats["sample_calls"]
            path = tc.save_weights_for_sampler("p").result(timeout=T).path
            b = sc.create_sampling_client(model_path=path).sample(prompt, 1, greedy).result(timeout=T)
            assert svc.scheduler.stats["sample_calls"] == calls + 1 and len(engine.generates) == 1
            assert a.sequences[0].tokens == b.sequences[0].tokens  # the same weights either way
    finally:
        svc.close()


def test_another_base_or_no_engine_refuses_to_start(tmp_path, monkeypatch):
    other = FleetEngine(tmp_path / "e", seed=7)
    monkeypatch.setattr(rollout_sampling, "make_service_engine", lambda *a: other)
    cfg = ServiceConfig(data_dir=str(tmp_path / "svc"), max_rank=8, rollout_url="http://engine.test:1")
    with pytest.raises(ValueError, match=r"does not serve this server's base 'debug:qwen3'.*nats per token") as e:
        build_service(BASE, cfg, log_fn=lambda *a: None)
    assert "\n" not in str(e.value)
    low = ServiceConfig(data_dir=str(tmp_path / "svc2"), max_rank=8, rollout_url="http://engine.test:1",
                        rollout_max_rank=4)
    with pytest.raises(ValueError, match=r"--max-rank 8 is above the engine's --rollout-max-rank 4"):
        build_service(BASE, low, log_fn=lambda *a: None)
    other.fail = OSError("[Errno 111] Connection refused")
    with pytest.raises(ValueError, match=r"rollout engine vllm at http://engine\.test:1: could not ask it .*refused"):
        build_service(BASE, cfg, log_fn=lambda *a: None)


@pytest.mark.parametrize("flags,message", [
    (["--rollout-url", "localhost:8001"], r"--rollout-url must be an http\(s\):// URL"),
    (["--rollout-url", "http://x", "--rollout-retries", "-1"], r"--rollout-retries must be >= 0"),
    (["--rollout-url", "http://x", "--rollout-max-rank", "-2"], r"--rollout-max-rank must be >= 1"),
    (["--rollout-url", "http://x", "--rollout-max-rank", "4"],
     r"--max-rank 8 is above the engine's --rollout-max-rank 4"),
])
def test_bad_rollout_flags_are_one_line_before_the_base_loads(tmp_path, monkeypatch, capsys, flags, message):
    from lorafleet import cli
    from lorafleet.service import server

    monkeypatch.setattr(server, "load_service_base", lambda *a, **k: pytest.fail("the base was loaded"))
    assert cli.main(["serve", "--data-dir", str(tmp_path), "--base", BASE, "--max-rank", "8", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.match(r"lorafleet serve: error: " + message, err), err


def test_an_unreachable_engine_is_one_line_naming_it(tmp_path, monkeypatch):
    """The real vLLM sink on a port nothing listens on: the service does not start (`lorafleet
    serve` prints this ValueError as its one error line)."""
    monkeypatch.setattr(rollout_sampling, "make_service_engine", REAL_SINK)
    port = free_port()
    cfg = ServiceConfig(data_dir=str(tmp_path), max_rank=8, rollout_url=f"http://127.0.0.1:{port}", rollout_retries=0)
    with pytest.raises(ValueError, match=rf"^rollout engine vllm at http://127\.0\.0\.1:{port}: .*refused") as e:
        build_service(BASE, cfg, log_fn=lambda *a: None)
    assert "\n" not in str(e.value)


def _failing_generate(monkeypatch, engine, failures: int | None, message: str, gate=None):
    """The engine's generate fails ``failures`` times (None: always), then works; returns its calls.
    With ``gate``, each call waits for it first (requests held in the engine)."""
    calls, real = [], engine.generate

    def generate(*args):
        calls.append(args[0])
        n = len(calls)
        if gate is not None:
            gate.wait(T)
        if failures is None or n <= failures:
            raise RolloutError(message)
        return real(*args)

    monkeypatch.setattr(engine, "generate", generate)
    return calls


def test_an_engine_failure_is_retried_by_the_sdk_itself(engine_server, monkeypatch):
    """The engine fails one request (all its engine calls) and recovers: that request's future is
    retryable (410), the SDK sends the sample again by itself, and the user's call gets the tokens."""
    svc, url, engine = engine_server
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = tok.encode("the cat")
        ref = own_greedy(svc, svc.adapter_name("alice", tc.model_id), prompt, 6)
        failures = svc.rollout.stats["failures"]
        calls = _failing_generate(monkeypatch, engine, svc.rollout.retries + 1, "HTTP 500 {'error': 'restarting'}")
        got = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                             types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result(timeout=T)
        assert got.sequences[0].tokens == ref.tokens
        assert len(calls) == svc.rollout.retries + 2  # the failed request's calls, then the SDK's resend
        assert svc.rollout.stats["failures"] == failures + 1


def test_identical_requests_failing_together_are_one_round(engine_server, monkeypatch):
    """A group of identical samples (one prompt, sent together) that the engine fails at once uses
    one round of the bound, not one per request: with a bound of 1 every one is resent and served."""
    from concurrent.futures import ThreadPoolExecutor

    svc, url, engine = engine_server
    monkeypatch.setattr(svc.rollout, "max_resends", 1)
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(tok.encode("the mat"))
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)  # pushed
        group, gate = 4, threading.Event()  # 4 = the rollout worker threads: all reach the engine
        calls = _failing_generate(monkeypatch, engine, group * (svc.rollout.retries + 1), "HTTP 503 busy", gate)
        params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
        with ThreadPoolExecutor(group) as pool:
            futs = [pool.submit(lambda: sampler.sample(prompt, 1, params).result(timeout=T)) for _ in range(group)]
            deadline = time.monotonic() + T
            while len(calls) < group:  # every request accepted and at the engine before any fails
                assert time.monotonic() < deadline
                time.sleep(0.01)
            gate.set()
            out = [f.result(timeout=T) for f in futs]
        assert len({tuple(o.sequences[0].tokens) for o in out}) == 1
        assert len(calls) == group * (svc.rollout.retries + 2)  # each: its failed calls, then its resend


def test_a_permanent_engine_failure_ends_after_bounded_resends(engine_server, monkeypatch):
    svc, url, engine = engine_server
    monkeypatch.setattr(svc.rollout, "max_resends", 1)
    with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        tc, tok = trained_client(sc, svc, steps=1)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(tok.encode("on the"))
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)  # pushed
        calls = _failing_generate(monkeypatch, engine, None, "HTTP 500 {'error': 'engine is broken'}")
        # on the wire: the first round is a 410 naming the engine's answer (the SDK's cue to resend)
        body = {"sampling_session_id": last_sampler_id(svc), "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt.to_ints()}]},
                "sampling_params": {"max_tokens": 3}}
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=10) as http:
            rid = http.post("/api/v1/asample", json=body).json()["request_id"]
            r = http.post("/api/v1/retrieve_future", json={"request_id": rid})
            assert r.status_code == 410 and r.json()["retryable"] is True, r.text
            assert "engine is broken" in r.json()["error"] and r.json()["category"] == "server"
            time.sleep(rollout_sampling.RETRY_AFTER_S + 0.05)  # past the door's refusal
            rid = http.post("/api/v1/asample", json=body).json()["request_id"]
            r = http.post("/api/v1/retrieve_future", json={"request_id": rid})
            assert r.status_code == 200 and "retryable" not in r.json(), r.text  # its second round: final
        # through the SDK: its resends are bounded too, and the error names the engine's answer
        n = len(calls)
        with pytest.raises(tinker.RequestFailedError, match=r"engine is broken.*failed 2 time\(s\)"):
            sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=T)
        assert len(calls) - n == 2 * (svc.rollout.retries + 1)  # 1 + max_resends rounds, no more


# ---- the real vLLM (the session's `vllm_server`) behind a real `lorafleet serve` process
def _serve(tmp_path, base, url, *extra):
    port = free_port()
    env = {**__import__("os").environ, "LORAFLEET_API_KEYS": f"alice:{KEY}", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path), "--base", str(base), "--max-rank", "8", "--threads", "1",
                             "--rollout-url", url, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            return proc, None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def _engine_adapters(url) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"] if m.get("parent")}


def test_real_vllm_serves_the_sdk_sampling_with_the_built_in_greedy_tokens(tmp_path, vllm_server):
    proc, url = _serve(tmp_path, vllm_server.base_dir, vllm_server.url, "--rollout-max-rank",
                       str(vllm_server.max_lora_rank))
    try:
        assert url is not None, proc.stdout.read()
        before = _engine_adapters(vllm_server.url)
        with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
            tc = sc.create_lora_training_client(base_model=str(vllm_server.base_dir), rank=4, seed=2).result(timeout=T)
            tok = tc.get_tokenizer()
            for _ in range(3):
                tc.forward_backward([datum(tok, "the cat sat on the mat")], "cross_entropy").result(timeout=T)
                tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=T)
            prompt = types.ModelInput.from_ints(tok.encode("the cat"))
            greedy = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
            through_vllm = tc.save_weights_and_get_sampling_client().sample(prompt, 1, greedy).result(timeout=T)
            (name,) = _engine_adapters(vllm_server.url) - before
            assert name.startswith("lf-")
            # a weights checkpoint opened as a sampler stays with the built-in decoder: the reference
            built_in = sc.create_sampling_client(model_path=tc.save_state("ref").result(timeout=T).path)
            ref = built_in.sample(prompt, 1, greedy).result(timeout=T)
            a, b = through_vllm.sequences[0], ref.sequences[0]
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason == "length"
            assert a.logprobs == pytest.approx(b.logprobs, rel=1e-4, abs=1e-5)
        deadline = time.monotonic() + 20  # the session closed: its adapter is unloaded from vLLM
        while name in _engine_adapters(vllm_server.url):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_a_vllm_on_another_base_is_refused(tmp_path, vllm_server, monkeypatch):
    """The real vLLM serves the 112-token base; a service on debug:qwen3 (256 tokens, other
    weights) refuses it at start, naming what the engine serves (the CLI prints this one line)."""
    monkeypatch.setattr(rollout_sampling, "make_service_engine", REAL_SINK)
    cfg = ServiceConfig(data_dir=str(tmp_path), max_rank=8, rollout_url=vllm_server.url,
                        rollout_max_rank=vllm_server.max_lora_rank)
    with pytest.raises(ValueError) as e:
        build_service(BASE, cfg, log_fn=lambda *a: None)
    assert re.fullmatch(r"rollout engine vllm at http://127\.0\.0\.1:\d+ does not serve this server's base "
                        r"'debug:qwen3' \(it serves '.*base'\): .* nats per token .*same model directory",
                        str(e.value)), str(e.value)
