"""`lorafleet serve` bounded in memory, responsive during uploads, and fair by quota (issue 14,
findings 2, 3 and 5).

* memory: a real `lorafleet serve` process with --memory-limit-mb refuses the documented
  32,768-token datum, a 40,000-token prompt and a job with batch_size 10**7 (400 naming the
  limit), runs a batch larger than one step as exact micro-batches, and its VmHWM stays under
  the limit;
* micro-batches: the gradients and results of a cut batch equal the uncut batch's;
* uploads: get_server_capabilities answers quickly while a large job upload is validated;
* quotas: each of slots, sessions, jobs and queued requests answers 429 with Retry-After and a
  JSON body naming the quota, and other tenants are not affected."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

import lorafleet as lf
from lorafleet.service.budget import MemoryBudget, ModelShape
from lorafleet.service.budget_fleet import BudgetedFleet
from lorafleet.service.core import ServiceConfig
from lorafleet.service.server import ServerThread, build_service, free_port, make_app

ALICE, BOB = "tml-alice-0123456789", "tml-bob-0123456789"
KEYS = {ALICE: "alice", BOB: "bob"}
MiB = 1 << 20


def _fb_body(model_id: str, seq: int, lengths: list[int], vocab: int = 100) -> bytes:
    data = [types.Datum(model_input=types.ModelInput.from_ints([random.randrange(vocab) for _ in range(n)]),
                        loss_fn_inputs={"target_tokens": [random.randrange(vocab) for _ in range(n)],
                                        "weights": [1.0] * n}) for n in lengths]
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=data, loss_fn="cross_entropy"), model_id=model_id, seq_id=seq)
    return forward_backward_request_to_proto(req).SerializeToString()


def _wait(http, rid, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.post("/api/v1/retrieve_future", json={"request_id": rid})
        if r.headers.get("content-type", "").startswith("application/x-protobuf"):
            return r
        body = r.json()
        if body.get("type") != "try_again":
            return r
    raise AssertionError("future never finished")


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _model(http, base) -> str:
    sid = http.post("/api/v1/create_session", json={}).json()["session_id"]
    r = http.post("/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": base,
                                                 "lora_config": {"rank": 2}})
    assert r.status_code == 200, r.text
    assert "model_id" in _wait(http, r.json()["request_id"]).json()
    return r.json()["model_id"], sid


LIMIT_MB = 1200


def test_real_server_stays_under_its_memory_limit(tmp_path):
    port = free_port()
    env = dict(os.environ, LORAFLEET_API_KEYS=f"alice:{ALICE}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path), "--base", "debug:qwen3_moe", "--max-rank", "8", "--threads", "1",
                             "--store", "memory", "--memory-limit-mb", str(LIMIT_MB),
                             "--max-body-bytes", str(8 * MiB), "--shutdown-grace-s", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        base = "debug:qwen3_moe"
        hp = {"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"}
        with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": ALICE}) as http:
            base = http.get("/api/v1/get_server_capabilities").json()["supported_models"][0]["model_name"]
            mid, _ = _model(http, base)
            # the documented maximum datum: it took RSS from 1.2 to 10.2 GB
            r = http.post("/api/v1/forward_backward", content=_fb_body(mid, 1, [32768]), headers=hp)
            assert r.status_code == 400 and "--memory-limit-mb" in r.json()["error"], r.text
            # six datums that fit one at a time but not together: micro-batches, all answered
            r = http.post("/api/v1/forward_backward", content=_fb_body(mid, 2, [1200] * 6), headers=hp)
            assert r.status_code == 200, r.text
            out = _wait(http, r.json()["request_id"])
            assert out.headers["content-type"].startswith("application/x-protobuf"), out.text
            from tinker.proto import tinker_public_pb2 as pb

            fbo = pb.ForwardBackwardOutput.FromString(out.content)
            assert fbo.loss_fn_outputs[0].num_datums == 6 and fbo.metrics["num_tokens:sum"] == 7200
            prompt = lambda n: {"chunks": [{"type": "encoded_text", "tokens": [1] * n}]}  # noqa: E731
            r = http.post("/api/v1/asample", json={"base_model": base, "prompt": prompt(40000),
                                                   "sampling_params": {"max_tokens": 4}})
            assert r.status_code == 400 and "max-prompt-tokens" in r.json()["error"], r.text
            r = http.post("/api/v1/asample", json={"base_model": base, "prompt": prompt(20000),
                                                   "sampling_params": {"max_tokens": 4}})
            assert r.status_code == 400 and "--memory-limit-mb" in r.json()["error"], r.text
            r = http.post("/api/v1/asample", json={"base_model": base, "prompt": prompt(4000), "num_samples": 128,
                                                   "sampling_params": {"max_tokens": 4096}})
            assert r.status_code == 400 and "--memory-limit-mb" in r.json()["error"], r.text
            lines = "".join(json.dumps({"prompt": f"rev: {w} =", "completion": f" {w[::-1]}"}) + "\n"
                            for w in ("abc", "bca", "cab", "bac"))
            job = {"adapter": {"name": "big", "rank": 2, "batch_size": 10**7, "max_steps": 1}, "data": {"jsonl": lines}}
            r = http.post("/api/v1/jobs", json=job)
            assert r.status_code == 400 and "batch_size" in r.json()["error"] and "--memory-limit-mb" in r.json()["error"]
            assert http.get("/api/v1/jobs").json()["jobs"] == []  # nothing queued
            assert http.get("/api/v1/healthz").status_code == 200
        peak = _vm(proc.pid, "VmHWM")
        assert peak < LIMIT_MB * MiB, f"VmHWM {peak / MiB:.0f} MiB over the {LIMIT_MB} MiB limit"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_micro_batches_equal_the_whole_batch():
    from lorafleet.models.debug import build_debug_model

    torch.manual_seed(0)
    model = build_debug_model("qwen3_moe")
    fleet = lf.Fleet(model, max_adapters=2, max_rank=4)
    cfg = lf.AdapterConfig(rank=4, target_modules="all-linear", experts=True, seed=3)
    fleet.add_adapter("a", cfg)
    fleet.add_adapter("b", cfg)
    with torch.no_grad():
        for p in fleet.lora_parameters():
            p.normal_(0, 0.05)  # B != 0: every factor gets a gradient
    shape = ModelShape.of(model)
    one = MemoryBudget(shape, 10 << 40, 0, 0)
    small = MemoryBudget(shape, one.train_bytes([40] * 3) + 1, 0, 0)  # 3 datums of 40 tokens a piece
    rng = random.Random(0)
    ex = [lf.Example("ab"[i % 2], [rng.randrange(100) for _ in range(n)], [rng.randrange(100) for _ in range(n)],
                     weights=[rng.random() for _ in range(n)]) for i, n in enumerate([40, 17, 33, 40, 9, 25, 40, 12])]

    def run(budget):
        fleet.zero_grad("a"), fleet.zero_grad("b")
        proxy = BudgetedFleet(fleet, budget)
        res = proxy.forward_backward(ex, "cross_entropy")
        return res, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in fleet.lora_parameters()], \
            proxy.pieces

    whole, g_whole, n_whole = run(one)
    cut, g_cut, n_cut = run(small)
    assert n_whole == 0 and n_cut >= 3
    assert cut.losses == pytest.approx(whole.losses, rel=1e-5)
    for a, b in zip(cut.logprobs, whole.logprobs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert cut.metrics.keys() == whole.metrics.keys()
    for k in whole.metrics:
        assert cut.metrics[k] == pytest.approx(whole.metrics[k], rel=1e-5)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(g_cut, g_whole)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in g_whole) ** 0.5
    assert den > 0 and num / den <= 1e-5
    # a datum that cannot fit alone is refused, and nothing ran
    fleet.zero_grad("a"), fleet.zero_grad("b")
    tiny = MemoryBudget(shape, one.train_bytes([20]) + 1, 0, 0)
    with pytest.raises(ValueError, match="memory-limit-mb"):
        BudgetedFleet(fleet, tiny).forward_backward(ex[:3], "cross_entropy")
    assert not fleet.pending_adapters()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=4, max_rank=8, long_poll_s=2.0,
                        store="memory", max_slots_per_tenant=1, max_sessions_per_tenant=3, max_jobs_per_tenant=1,
                        max_queued_per_tenant=2)
    svc = build_service("debug:qwen3_moe", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys=KEYS)
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


def _quota(r, quota: str):
    assert r.status_code == 429, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["quota"] == quota and quota.split("_")[0] in body["error"] and body["limit"] >= 1, body
    return body


def _client(url, key):
    return httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": key})


def test_upload_does_not_block_other_tenants(server):
    svc, url = server
    words = ["".join(random.Random(i).choices("abcdef", k=6)) for i in range(60000)]
    lines = "".join(json.dumps({"prompt": f"rev: {w} = " + "x" * 40, "completion": f" {w[::-1]}"}) + "\n"
                    for w in words)
    job = {"adapter": {"name": "up", "rank": 2, "max_steps": 1}, "data": {"jsonl": lines}}
    assert len(json.dumps(job)) > 5 * MiB
    done = {}

    def upload():
        t0 = time.monotonic()
        with _client(url, BOB) as http:
            done["r"] = http.post("/api/v1/jobs", json=job)
        done["s"] = time.monotonic() - t0

    th = threading.Thread(target=upload)
    lat = []
    with _client(url, ALICE) as http:
        http.get("/api/v1/get_server_capabilities")
        th.start()
        while th.is_alive():
            t0 = time.monotonic()
            assert http.get("/api/v1/get_server_capabilities").status_code == 200
            lat.append(time.monotonic() - t0)
            time.sleep(0.05)
    th.join()
    assert done["r"].status_code == 200, done["r"].text
    assert done["s"] > 1.5 and len(lat) >= 5, (done["s"], lat)  # the upload took a while ...
    assert max(lat) < min(1.0, done["s"] / 2), (max(lat), done["s"])  # ... and others were answered meanwhile
    with _client(url, BOB) as http:
        jid = done["r"].json()["job_id"]
        http.post(f"/api/v1/jobs/{jid}/cancel")
        _final(http, jid)


def _final(http, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (status := http.get(f"/api/v1/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.1)
    return status


def test_session_quota(server):
    _, url = server
    with _client(url, ALICE) as alice, _client(url, BOB) as bob:
        sids = []
        while True:
            r = alice.post("/api/v1/create_session", json={})
            if r.status_code != 200:
                break
            sids.append(r.json()["session_id"])
        _quota(r, "sessions")
        assert 1 <= len(sids) <= 3
        assert bob.post("/api/v1/create_session", json={}).status_code == 200  # bob is not affected
        for sid in sids:
            alice.post(f"/api/v1/sessions/{sid}/finish")
        assert alice.post("/api/v1/create_session", json={}).status_code == 200  # room again


def test_slot_and_job_quotas(server):
    svc, url = server
    lines = "".join(json.dumps({"prompt": f"rev: {w} =", "completion": f" {w[::-1]}"}) + "\n"
                    for w in ("abc", "bca", "cab", "bac"))
    job = {"adapter": {"name": "j", "rank": 2, "max_steps": 2, "batch_size": 2}, "data": {"jsonl": lines}}
    with _client(url, ALICE) as alice, _client(url, BOB) as bob:
        mid, sid = _model(alice, svc.base_name)
        r = alice.post("/api/v1/create_model", json={"session_id": sid, "model_seq_id": 1,
                                                      "base_model": svc.base_name, "lora_config": {"rank": 2}})
        _quota(r, "slots")
        bob_mid, bob_sid = _model(bob, svc.base_name)  # bob is not affected
        # alice's job waits: she holds her one slot; bob's later job is not stuck behind it
        a_job = alice.post("/api/v1/jobs", json=job)
        assert a_job.status_code == 200, a_job.text
        _quota(alice.post("/api/v1/jobs", json=job), "jobs")
        bob.post(f"/api/v1/sessions/{bob_sid}/finish")
        b_job = bob.post("/api/v1/jobs", json=job).json()
        assert _final(bob, b_job["job_id"]) == "succeeded"
        assert alice.get(f"/api/v1/jobs/{a_job.json()['job_id']}").json()["status"] == "queued"
        alice.post(f"/api/v1/sessions/{sid}/finish")  # her slot frees: her job runs
        assert _final(alice, a_job.json()["job_id"]) == "succeeded"


def test_queued_requests_quota(server):
    svc, url = server
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    body = {"base_model": svc.base_name, "prompt": prompt, "sampling_params": {"max_tokens": 2}}
    svc.scheduler.pause()  # nothing finishes: every accepted request stays queued
    try:
        with _client(url, ALICE) as alice, _client(url, BOB) as bob:
            rids = []
            for _ in range(2):
                r = alice.post("/api/v1/asample", json=body)
                assert r.status_code == 200, r.text
                rids.append(r.json()["request_id"])
            _quota(alice.post("/api/v1/asample", json=body), "queued_requests")
            r = bob.post("/api/v1/asample", json=body)  # bob's own queue
            assert r.status_code == 200
            rids_bob = [r.json()["request_id"]]
    finally:
        svc.scheduler.resume()
    for rid in rids + rids_bob:
        assert svc.futures.wait_sync(rid, 60) is not None
    with _client(url, ALICE) as alice:
        assert alice.post("/api/v1/asample", json=body).status_code == 200  # finished ones free the quota
