"""The service end to end with the unmodified official Tinker SDK (tinker==0.38.0) as client.

One server (uvicorn in a thread on 127.0.0.1, a free port) on the tiny qwen3_moe debug base is
shared by the module; every wait is bounded.
"""

from __future__ import annotations

import threading
import time

import pytest

import tinker
import httpx

from tinker import types  # noqa: E402

from lorafleet.service.core import ServiceConfig  # noqa: E402
from lorafleet.service.server import ServerThread, build_service, make_app  # noqa: E402

KEY_A, KEY_B = "tml-alice-0123456789", "tml-bob-0123456789"
T = 60  # seconds: bound on every SDK future


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the random-init debug base: it starts at once (the pretrained default is for learning)
    cfg = ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=12, max_rank=8, long_poll_s=5.0,
                        client_config={"fwdbwd_max_chunk_len": 2})
    svc = build_service("debug:qwen3_moe", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY_A: "alice", KEY_B: "bob"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


def client(url, key):
    return tinker.ServiceClient(base_url=url, api_key=key)


def datum(tok, text):
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def wait_queued(svc, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while svc.scheduler.queued() < n:
        assert time.monotonic() < deadline, f"only {svc.scheduler.queued()} of {n} ops queued"
        time.sleep(0.01)


def test_sl_loop_save_load_sample(server):
    svc, url = server
    sc = client(url, KEY_A)
    caps = sc.get_server_capabilities()
    assert svc.base_name in [m.model_name for m in caps.supported_models]
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=1).result(timeout=T)
    tok = tc.get_tokenizer()  # offline: get_info's tokenizer_id is a local directory
    data = [datum(tok, "the cat sat"), datum(tok, "on the mat")]
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        out = fb.result(timeout=T)
        assert len(out.loss_fn_outputs) == 2
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == len(data[0].model_input.to_ints())
        losses.append(out.metrics["loss:sum"])
        assert opt.result(timeout=T).metrics["step:max"] >= 1
    assert losses[-1] < losses[0] * 0.9, losses

    fwd = tc.forward(data, "cross_entropy").result(timeout=T)
    saved = tc.save_state("ckpt-1").result(timeout=T).path
    assert saved.startswith("tinker://") and "/weights/ckpt-1" in saved

    resumed = sc.create_training_client_from_state_with_optimizer(saved).result(timeout=T)
    fwd2 = resumed.forward(data, "cross_entropy").result(timeout=T)
    assert fwd2.metrics["loss:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-6)
    # the resumed optimizer state continues the run exactly (gradients accumulated over two calls)
    for c in (tc, resumed):
        c.forward_backward(data[:1], "cross_entropy")
        c.forward_backward(data[1:], "cross_entropy")
        c.optim_step(types.AdamParams(learning_rate=5e-3)).result(timeout=T)
    a = tc.forward(data, "cross_entropy").result(timeout=T).metrics["loss:sum"]
    b = resumed.forward(data, "cross_entropy").result(timeout=T).metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-5)
    # load_state into an existing model (weights only)
    resumed.load_state(saved).result(timeout=T)
    assert resumed.forward(data, "cross_entropy").result(timeout=T).metrics["loss:sum"] == pytest.approx(
        fwd.metrics["loss:sum"], rel=1e-6)

    # other losses of the engine
    n = len(data[0].model_input.to_ints())
    rl = [types.Datum(model_input=data[0].model_input,
                      loss_fn_inputs={"target_tokens": data[0].loss_fn_inputs["target_tokens"],
                                      "logprobs": [-2.0] * n, "advantages": [0.5] * n})]
    for loss in ("importance_sampling", "ppo", "cispo"):
        out = tc.forward_backward(rl, loss).result(timeout=T)
        assert "loss:sum" in out.metrics
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=T)

    # sampling: a snapshot sampler and one from a tinker:// sampler path
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tok.encode("the cat"))
    res = sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(
        max_tokens=12, temperature=1.0, seed=3)).result(timeout=T)
    assert len(res.sequences) == 3
    for s in res.sequences:
        assert len(s.logprobs) == len(s.tokens) <= 12
    # string stops are honoured: stop on the text of a token the greedy run produces
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result(timeout=T)
    toks = greedy.sequences[0].tokens
    assert len(toks) == 8 and greedy.sequences[0].stop_reason == "length"
    stop_text = tok.decode([toks[2]])
    assert stop_text
    st = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_text])
                        ).result(timeout=T).sequences[0]
    assert st.stop_reason == "stop" and stop_text in tok.decode(st.tokens) and len(st.tokens) <= 3
    lps = sampler.compute_logprobs(prompt).result(timeout=T)
    assert lps[0] is None and len(lps) == len(prompt.to_ints())
    path = tc.save_weights_for_sampler("for-sampling").result(timeout=T).path
    s2 = sc.create_sampling_client(model_path=path)
    lps2 = s2.compute_logprobs(prompt).result(timeout=T)
    assert lps2[1:] == pytest.approx(lps[1:], rel=1e-5)
    base = sc.create_sampling_client(base_model=svc.base_name)
    assert base.compute_logprobs(prompt).result(timeout=T)[1:] != pytest.approx(lps[1:], rel=1e-6)
    sc.close("success").result(timeout=T)


def test_chunks_dpo_custom_loss(server):
    svc, url = server
    with client(url, KEY_A) as sc:  # the `with` block finishes the session on exit
        tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4).result(timeout=T)
        tok = tc.get_tokenizer()
        data = [datum(tok, t) for t in ("a b", "cc dd", "eee", "ffff gg", "h")]
        calls = svc.scheduler.stats["fwdbwd_calls"]
        # 5 datums -> 3 chunks (fwdbwd_max_chunk_len=2) sent concurrently, first chunk last:
        # run in seq_id order, merged into one step, gradients accumulated
        out = tc.forward_backward(data, "cross_entropy").result(timeout=T)
        assert len(out.loss_fn_outputs) == 5
        assert svc.scheduler.stats["fwdbwd_calls"] == calls + 1
        one = [tc.forward([d], "cross_entropy").result(timeout=T).metrics["loss:sum"] for d in data]
        assert out.metrics["loss:sum"] == pytest.approx(sum(one), rel=1e-5)
        dpo = tc.forward_backward(data[:4], "dpo", {"beta": 0.1}).result(timeout=T)
        assert dpo.metrics["loss:sum"] > 0

        def custom(d, lps):
            loss = sum((-lp).sum() for lp in lps)
            return loss, {"custom:sum": float(loss.detach())}

        cu = tc.forward_backward_custom(data[:2], custom).result(timeout=T)
        assert cu.metrics["custom:sum"] == pytest.approx(sum(one[:2]), rel=1e-5)
        assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=T).metrics["step:max"] == 1


def _train(tc, data, steps, futures_only=False):
    fbs, opts = [], []
    for _ in range(steps):
        fbs.append(tc.forward_backward(data, "cross_entropy"))
        opts.append(tc.optim_step(types.AdamParams(learning_rate=1e-2)))
    if futures_only:
        return fbs, opts
    return [f.result(timeout=T).metrics["loss:sum"] for f in fbs]


def test_two_tenants_mixed_steps_equal_alone(server):
    svc, url = server
    sa, sb = client(url, KEY_A), client(url, KEY_B)
    tok = sa.create_lora_training_client(base_model=svc.base_name, rank=4).result(timeout=T).get_tokenizer()
    da = [datum(tok, "alpha beta"), datum(tok, "gamma delta epsilon")]
    db = [datum(tok, "one two three four five")]
    alone_a = _train(sa.create_lora_training_client(base_model=svc.base_name, rank=4, seed=7).result(timeout=T), da, 3)
    alone_b = _train(sb.create_lora_training_client(base_model=svc.base_name, rank=8, seed=9).result(timeout=T), db, 3)

    ta = sa.create_lora_training_client(base_model=svc.base_name, rank=4, seed=7).result(timeout=T)
    tb = sb.create_lora_training_client(base_model=svc.base_name, rank=8, seed=9).result(timeout=T)
    before = dict(svc.scheduler.stats)
    svc.scheduler.pause()  # both tenants queue all their work, then it runs in shared steps
    try:
        out = {}
        threads = [threading.Thread(target=lambda k, c, d: out.__setitem__(k, _train(c, d, 3, True)), args=a)
                   for a in (("a", ta, da), ("b", tb, db))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        wait_queued(svc, 12)
    finally:
        svc.scheduler.resume()
    mixed_a = [f.result(timeout=T).metrics["loss:sum"] for f in out["a"][0]]
    mixed_b = [f.result(timeout=T).metrics["loss:sum"] for f in out["b"][0]]
    assert mixed_a == pytest.approx(alone_a, rel=1e-5)
    assert mixed_b == pytest.approx(alone_b, rel=1e-5)
    assert svc.scheduler.stats["max_tenants_per_step"] >= 2
    assert svc.scheduler.stats["fwdbwd_calls"] - before["fwdbwd_calls"] == 3  # 6 requests, 3 mixed steps

    # sampling requests of both tenants' adapters share decode batches, results as if alone
    pa = types.ModelInput.from_ints(tok.encode("alpha"))
    pb = types.ModelInput.from_ints(tok.encode("one"))
    ca, cb = ta.save_weights_and_get_sampling_client(), tb.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    ref_a = ca.sample(pa, 1, params).result(timeout=T).sequences[0].tokens
    ref_b = cb.sample(pb, 1, params).result(timeout=T).sequences[0].tokens
    svc.scheduler.pause()
    try:
        fa, fb = ca.sample(pa, 1, params), cb.sample(pb, 1, params)
        wait_queued(svc, 2)
    finally:
        svc.scheduler.resume()
    assert fa.result(timeout=T).sequences[0].tokens == ref_a
    assert fb.result(timeout=T).sequences[0].tokens == ref_b
    assert svc.scheduler.stats["max_adapters_per_sample"] >= 2
    sa.close("success").result(timeout=T)
    sb.close("success").result(timeout=T)


def test_auth_isolation_and_bad_requests(server):
    svc, url = server
    sa = client(url, KEY_A)
    ta = sa.create_lora_training_client(base_model=svc.base_name, rank=4).result(timeout=T)
    tok = ta.get_tokenizer()
    path = ta.save_state("mine").result(timeout=T).path
    h = {"X-API-Key": KEY_B}
    with httpx.Client(base_url=url, timeout=30) as http:
        # bad / missing key -> 401 with a JSON body
        for hdr in ({"X-API-Key": "tml-nope-nope-nope"}, {}):
            r = http.post("/api/v1/create_session", json={}, headers=hdr)
            assert r.status_code == 401 and "error" in r.json()
        # tenant B cannot see A's model, checkpoint, futures or session
        sid_b = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "x"}, headers=h).json()["session_id"]
        r = http.post("/api/v1/get_info", json={"model_id": ta.model_id}, headers=h)
        assert r.status_code == 404 and ta.model_id in r.json()["error"]
        r = http.post("/api/v1/optim_step", json={"model_id": ta.model_id, "seq_id": 99, "adam_params": {}}, headers=h)
        assert r.status_code == 404
        from tinker.proto import tinker_public_pb2 as pb

        msg = pb.ForwardBackwardRequest(model_id=ta.model_id, seq_id=99, loss_fn="cross_entropy")
        r = http.post("/api/v1/forward_backward", content=msg.SerializeToString(),
                      headers={**h, "Content-Type": "application/x-protobuf"})
        assert r.status_code in (400, 404) and "error" in r.json()
        r = http.post("/api/v1/create_sampling_session", json={"session_id": sid_b, "sampling_session_seq_id": 0,
                                                               "model_path": path}, headers=h)
        assert r.status_code == 404
        r = http.post("/api/v1/load_weights", json={"session_id": sid_b, "model_seq_id": 0, "path": path,
                                                    "optimizer": True}, headers=h)
        assert r.status_code == 404
        sid_a = ta.model_id.split(":")[0]
        assert http.post(f"/api/v1/sessions/{sid_a}/finish", json={}, headers=h).status_code == 404
        # checkpoint names cannot escape the storage root
        for bad in ("../../etc", "a/b", "..", ".hidden"):
            r = http.post("/api/v1/save_weights", json={"model_id": ta.model_id, "seq_id": 1000, "path": bad},
                          headers={"X-API-Key": KEY_A})
            assert r.status_code == 400 and "error" in r.json()
        r = http.post("/api/v1/create_sampling_session", json={"session_id": sid_b, "sampling_session_seq_id": 1,
                                                               "model_path": "tinker://../../x/weights/y"}, headers=h)
        assert r.status_code == 400
        # malformed bodies -> 4xx JSON
        r = http.post("/api/v1/create_model", content=b"{not json", headers=h)
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = http.post("/api/v1/forward_backward", content=b"\xff\xfe garbage",
                      headers={**h, "Content-Type": "application/x-protobuf"})
        assert r.status_code == 400 and "error" in r.json()
        r = http.post("/api/v1/create_model", json={"session_id": sid_b, "model_seq_id": 0, "base_model": "nope",
                                                    "lora_config": {"rank": 4}}, headers=h)
        assert r.status_code == 400 and "base_model" in r.json()["error"]
        r = http.post("/api/v1/create_model", json={"session_id": sid_b, "model_seq_id": 0,
                                                    "base_model": svc.base_name, "lora_config": {"rank": 999}}, headers=h)
        assert r.status_code == 400
        r = http.post("/api/v1/asample", json={"prompt": {"chunks": [{"tokens": [10**9]}]}, "base_model": svc.base_name,
                                               "sampling_params": {"max_tokens": 2}}, headers=h)
        assert r.status_code == 400 and "token" in r.json()["error"]
        r = http.post("/api/v1/retrieve_future", json={"request_id": "nope"}, headers=h)
        assert r.status_code == 404
        big = b"x" * (svc.config.max_body_bytes + 1)
        r = http.post("/api/v1/create_session", content=big, headers=h)
        assert r.status_code == 413 and "error" in r.json()
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    # the server still serves the SDK after all that
    ok = datum(tok, "still serving")
    out = ta.forward([ok], "cross_entropy").result(timeout=T)  # seq_id 2 (save_state was 1)
    assert out.metrics["loss:sum"] > 0
    # a rejected request (token id out of the vocabulary) releases its seq_id: the next one runs
    from tinker.proto.request_conv import forward_backward_request_to_proto

    def fb_body(seq, tokens):
        req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
            data=[types.Datum(model_input=types.ModelInput.from_ints(tokens),
                              loss_fn_inputs={"target_tokens": tokens})], loss_fn="cross_entropy"),
            model_id=ta.model_id, seq_id=seq)
        return forward_backward_request_to_proto(req).SerializeToString()

    ha = {"X-API-Key": KEY_A, "Content-Type": "application/x-protobuf"}
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/api/v1/forward_backward", content=fb_body(3, [1, 10**6]), headers=ha)
        assert r.status_code == 400 and "token" in r.json()["error"]
        r = http.post("/api/v1/forward_backward", content=fb_body(4, [1, 9, 10]), headers=ha)
        assert r.status_code == 200
        rid = r.json()["request_id"]
        for _ in range(10):
            res = http.post("/api/v1/retrieve_future", json={"request_id": rid}, headers={"X-API-Key": KEY_A})
            if "protobuf" in res.headers["content-type"]:
                break
        assert "protobuf" in res.headers["content-type"]
        # the same seq_id twice is refused
        r = http.post("/api/v1/forward_backward", content=fb_body(4, [1, 9, 10]), headers=ha)
        assert r.status_code == 400 and "seq_id" in r.json()["error"]
    sa.close("success").result(timeout=T)


def test_slot_pool_full_is_a_clear_error_and_close_frees_slots(server):
    svc, url = server
    sc = client(url, KEY_B)
    made, err = 0, None
    for _ in range(svc.config.max_adapters + 1):  # bounded
        try:
            sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
            made += 1
        except Exception as e:  # noqa: BLE001 - the SDK's RequestFailedError
            err = e
            break
    assert err is not None and "slots are in use" in str(err) and 1 <= made <= svc.config.max_adapters
    sc.close("success").result(timeout=T)
    sc2 = client(url, KEY_B)
    sc2.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
    sc2.close("success").result(timeout=T)


def test_silent_session_is_finished(server):
    svc, url = server
    sc = client(url, KEY_A)
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T)
    sid = tc.model_id.split(":")[0]
    svc.store.get_session(sid, "alice").last_seen -= svc.config.session_timeout_s + 1
    rids = svc.reap_once()
    assert len(rids) == 1 and svc.futures.wait_sync(rids[0], T) is not None
    assert svc.adapter_name("alice", tc.model_id) not in svc.fleet.adapters
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/api/v1/get_info", json={"model_id": tc.model_id}, headers={"X-API-Key": KEY_A})
        assert r.status_code == 404 and "closed" in r.json()["error"]
    sc.close("success").result(timeout=T)
