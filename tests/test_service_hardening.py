"""`lorafleet serve` as a shared platform (issue 14): bad inputs answer a 4xx with a JSON body,
half-open connections are dropped, samplers wait for a slot, healthz reports the scheduler's
liveness, /metrics, request ids, and SIGTERM shuts down gracefully (rc 0, WAL checkpointed).

One server (uvicorn in a thread on 127.0.0.1) on the random-init debug qwen3_moe base, 2 slots;
every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import httpx
import pytest

import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from lorafleet.service.core import ServiceConfig
from lorafleet.service.scheduler import Op
from lorafleet.service.server import ServerThread, build_service, free_port, make_app

KEY = "tml-alice-0123456789"
H = {"X-API-Key": KEY}
T = 60
LIMIT = 1 << 20  # a 1 MiB body limit: the zstd bomb stays cheap


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=2, max_rank=8, long_poll_s=5.0,
                        max_body_bytes=LIMIT)
    svc = build_service("debug:qwen3_moe", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY: "alice"})
    srv = ServerThread(app, header_timeout_s=1.0)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


def _datum(ids, weight=1.0):
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [weight] * (len(ids) - 1)})


def _bad(r, status=400, word=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] and (word is None or word in body["error"]), body
    return body


def test_bad_json_bodies_are_4xx(server):
    _, url = server
    import zstandard

    with httpx.Client(base_url=url, timeout=30, headers=H) as http:
        deep = "[" * 100_000 + "]" * 100_000  # was a 500 RecursionError
        _bad(http.post("/api/v1/create_session", content=deep, headers={"Content-Type": "application/json"}),
             400, "nested")
        bomb = zstandard.ZstdCompressor().compress(b"{" + b" " * (4 * LIMIT) + b"}")  # was a 400
        assert len(bomb) < LIMIT
        _bad(http.post("/api/v1/create_session", content=bomb, headers={"Content-Encoding": "zstd"}), 413, "limit")
        ok = zstandard.ZstdCompressor().compress(json.dumps({"tags": []}).encode())
        assert http.post("/api/v1/create_session", content=ok, headers={"Content-Encoding": "zstd"}).status_code == 200
        assert http.get("/api/v1/healthz").status_code == 200  # still serving


def test_sampling_params_checked_at_the_door(server):
    svc, url = server
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    with httpx.Client(base_url=url, timeout=30, headers=H) as http:
        sid = http.post("/api/v1/create_session", json={}).json()["session_id"]
        for sp, word in (({"max_tokens": 0}, "max_tokens"),  # was run as 16
                         ({"max_tokens": 2, "seed": 2**80}, "seed"),  # was a failed future later
                         ({"max_tokens": 2, "seed": -1}, "seed")):
            _bad(http.post("/api/v1/asample", json={"base_model": svc.base_name, "prompt": prompt,
                                                    "sampling_params": sp}), 400, word)
        r = http.post("/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": svc.base_name,
                                                     "lora_config": {"rank": 2, "seed": 2**80}})
        _bad(r, 400, "seed")
        r = http.post("/api/v1/asample", json={"base_model": svc.base_name, "prompt": prompt,
                                               "sampling_params": {"max_tokens": 2, "seed": 2**62}})
        assert r.status_code == 200


def test_loss_configs_refused_at_the_request_and_huge_weights_serialise(server):
    svc, url = server
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
    raw = sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)  # seq_ids: ours

    def body(seq, loss_fn, cfg):
        d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "logprobs": [-1.0] * 3,
                                        "advantages": [1.0] * 3})
        req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
            data=[d, d] if loss_fn == "dpo" else [d], loss_fn=loss_fn, loss_fn_config=cfg),
            model_id=raw.model_id, seq_id=seq)
        return forward_backward_request_to_proto(req).SerializeToString()

    hp = dict(H, **{"Content-Type": "application/x-protobuf"})
    with httpx.Client(base_url=url, timeout=30) as http:
        for seq, (loss_fn, cfg, word) in enumerate((
                ("ppo", {"clip_low_threshold": float("nan")}, "clip_low_threshold"),
                ("ppo", {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0}, "above"),
                ("dpo", {"beta": -1.0}, "beta")), start=1):
            _bad(http.post("/api/v1/forward_backward", content=body(seq, loss_fn, cfg), headers=hp), 400, word)
    # weights of 1e38: the loss and the gradient are not finite, the step is skipped and the
    # optim_step result is still JSON (it was a 400 "Out of range float values" on retrieve)
    fb = tc.forward_backward([_datum([1, 5, 9, 13], 1e38)], "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result(timeout=T)
    m = opt.result(timeout=T).metrics
    assert m["skipped:max"] == 1.0 and "grad_norm:mean" not in m, m
    fb = tc.forward_backward([_datum([1, 5, 9, 13])], "cross_entropy")  # the model is fine afterwards
    m = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=T).metrics
    fb.result(timeout=T)
    assert "skipped:max" not in m and m["step:max"] == 1.0, m
    sc.close("success").result(timeout=T)


def test_half_open_connections_are_dropped(server):
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for payload in (b"", b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\nX-Sl"):  # nothing; half a header
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(payload)
        socks.append(s)
    t0 = time.monotonic()
    for s in socks:
        assert s.recv(1024) == b""  # closed by the server (the 1 s header timeout), not held forever
        s.close()
    assert time.monotonic() - t0 < 8
    with httpx.Client(base_url=url, timeout=10) as http:  # a keep-alive client is not affected
        for _ in range(2):
            assert http.get("/api/v1/healthz").status_code == 200
            time.sleep(1.2)


def test_sampler_waits_for_a_slot(server):
    svc, url = server
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    sp = types.SamplingParams(max_tokens=2)
    sampler.sample(prompt, num_samples=1, sampling_params=sp).result(timeout=T)  # its weights take slot 2
    other = tinker.ServiceClient(base_url=url, api_key=KEY)
    other.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)  # evicts them
    fut = sampler.sample(prompt, num_samples=1, sampling_params=sp)  # both slots hold training models
    deadline = time.monotonic() + 20
    while not svc.scheduler._slot_wait:
        assert time.monotonic() < deadline, "the sample never waited for a slot"
        time.sleep(0.05)
    assert svc.scheduler.queued() >= 1
    other.close("success").result(timeout=T)  # frees a slot: the waiting sample runs (it used to fail)
    assert len(fut.result(timeout=T).sequences) == 1
    # a bounded wait: past --slot-wait-s it fails with a message saying so
    other2 = tinker.ServiceClient(base_url=url, api_key=KEY)
    other2.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
    svc.scheduler.slot_wait_s = 0.5
    try:
        with pytest.raises(Exception, match="free adapter slot"):
            sampler.sample(prompt, num_samples=1, sampling_params=sp).result(timeout=T)
    finally:
        svc.scheduler.slot_wait_s = svc.config.slot_wait_s
        other2.close("success").result(timeout=T)
        sc.close("success").result(timeout=T)


def test_healthz_reports_a_wedged_scheduler(server):
    svc, url = server
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.get("/api/v1/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        rid = svc.futures.create("alice", "test", durable=False)
        svc.scheduler.submit(Op(rid, "alice", "control", lambda fleet: time.sleep(2.0) or {}))
        svc.config.health_stall_s = 0.5
        try:
            deadline, seen = time.monotonic() + 10, None
            while seen is None and time.monotonic() < deadline:
                r = http.get("/api/v1/healthz")
                seen = r if r.status_code == 503 else None
                time.sleep(0.1)
            assert seen is not None and "no life" in seen.json()["error"], "healthz never saw the stall"
            assert seen.json()["scheduler"]["alive"] and seen.json()["scheduler"]["cycle_s"] > 0.5
            assert svc.futures.wait_sync(rid, 10) is not None
            assert http.get("/api/v1/healthz").status_code == 200
        finally:
            svc.config.health_stall_s = ServiceConfig().health_stall_s


def test_metrics_and_request_ids(server):
    _, url = server
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.post("/api/v1/create_session", json={}, headers=dict(H, **{"X-Request-Id": "abc123"}))
        assert r.headers["x-request-id"] == "abc123"
        assert http.get("/api/v1/healthz").headers["x-request-id"]  # a new one when the client sent none
        http.post("/api/v1/get_info", json={"model_id": "nope"}, headers=H)
        text = http.get("/metrics").text
    for needle in ('lorafleet_http_requests_total{method="POST",route="/api/v1/create_session",status="200"}',
                   'lorafleet_http_requests_total{method="POST",route="/api/v1/get_info",status="404"}',
                   'lorafleet_http_request_seconds_bucket{le="0.001",route="/api/v1/create_session"}',
                   'lorafleet_tenant_requests_total{status_class="2xx",tenant="alice"}',
                   "lorafleet_scheduler_queue_depth", "lorafleet_adapter_slots 2.0", "lorafleet_adapter_slots_used",
                   "lorafleet_scheduler_heartbeat_age_seconds"):
        assert needle in text, needle


def test_serve_flags_default_to_the_service_config():
    from lorafleet.cli import SERVE_LIMITS

    defaults = {f.name: f.default for f in fields(ServiceConfig)}
    for name, (_, default, _) in SERVE_LIMITS.items():
        assert defaults[name] == default, name


def test_sigterm_is_a_graceful_shutdown(tmp_path):
    port = free_port()
    env = dict(os.environ, LORAFLEET_API_KEYS=f"alice:{KEY}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path), "--base", "debug:qwen3_moe", "--max-rank", "8", "--threads", "1",
                             "--shutdown-grace-s", "5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=H) as http:
            sid = http.post("/api/v1/create_session", json={}).json()["session_id"]
            assert http.post("/api/v1/session_heartbeat", json={"session_id": sid}).status_code == 200
        assert (tmp_path / "lorafleet.db-wal").exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out  # was -15, with service.close() never run
    assert "lorafleet serve: stopped" in out, out
    assert "req=" in out and "tenant=alice" in out, out  # log lines carry the request id and tenant
    wal = tmp_path / "lorafleet.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed
    import sqlite3

    with sqlite3.connect(tmp_path / "lorafleet.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1


def test_bad_job_optimizer_is_a_400_and_the_connection_lives(server):
    """A job with ``optimizer: {lr: "x"}`` was a 500 TypeError and then a connection reset on that
    keep-alive connection; now a 400 naming the field, and the same connection keeps serving."""
    _, url = server
    lines = json.dumps({"prompt": "rev: abc =", "completion": " cba"}) + "\n"
    with httpx.Client(base_url=url, timeout=30, headers=H) as http:
        for optimizer, word in (({"lr": "x"}, "lr"), ({"lr": float("inf")}, "lr"), ("x", "optimizer"),
                                ({"lr": 1e-3, "betas": ["a", 0.9]}, "betas")):
            body = {"adapter": {"name": "a", "rank": 2, "max_steps": 1, "optimizer": optimizer},
                    "data": {"jsonl": lines}}
            r = http.post("/api/v1/jobs", content=json.dumps(body).replace("Infinity", "1e999"),
                          headers={"Content-Type": "application/json"})
            _bad(r, 400, word)
        assert http.get("/api/v1/jobs").status_code == 200  # the same keep-alive connection
        assert http.get("/api/v1/jobs").json()["jobs"] == []  # nothing was queued
