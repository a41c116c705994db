"""Issue 14: a large forward_backward is cut into micro-batches of whole datums that run in
successive scheduler cycles, other tenants' work between them (service/fb_pieces.py).

Scheduler + FutureStore on the debug fleet, no HTTP: the worker thread is the service's own."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tinker.proto import tinker_public_pb2 as pb

import lorafleet as lf
from lorafleet.models.debug import build_debug_model
from lorafleet.service.fb_pieces import piece_ranges
from lorafleet.service.futures import Failure, FutureStore, Result
from lorafleet.service.scheduler import Op, Scheduler

T = 60  # seconds: bound on every wait
CE = ("cross_entropy", (), False)


def _fleet():
    torch.manual_seed(0)  # every fleet of a test starts from the same weights
    fleet = lf.Fleet(build_debug_model("qwen3_moe"), max_adapters=4, max_rank=8)
    for name in ("a", "b"):
        fleet.add_adapter(name, lf.AdapterConfig(rank=4, target_modules="all-linear", seed=1))
    with torch.no_grad():  # a non-zero B, so the gradients reach both factors
        for p in fleet.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return fleet


@pytest.fixture
def sched():
    made = []

    def make(fleet, **kw):
        s = Scheduler(fleet, FutureStore(), batch_window_s=0.0, **kw)
        s.open_model("m")
        s.open_model("n")
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _datums(n, length, adapter="a", seed=0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = g.integers(3, 200, length + 1).tolist()
        out.append(lf.Example(adapter, toks[:-1], toks[1:], weights=g.uniform(0.5, 1.5, length).tolist()))
    return out


def _fwdbwd(s, tenant, model, seq, examples, group=CE):
    rid = s.futures.create(tenant, "forward_backward", durable=False)
    s.submit(Op(rid, tenant, "fwdbwd", model_id=model, seq_id=seq, examples=examples, group=group))
    return rid


def _optim_step(s, tenant, model, seq, adapter):
    rid = s.futures.create(tenant, "optim_step", durable=False)

    def fn(fleet):
        fleet.set_optimizer(adapter, lf.OptimConfig(lr=1e-2))
        return {"grad_norm": float(fleet.optim_step([adapter])[adapter]["grad_norm"])}

    s.submit(Op(rid, tenant, "control", fn, model_id=model, seq_id=seq))
    return rid


def _decoded(res: Result):
    out = pb.ForwardBackwardOutput()
    out.ParseFromString(res.body)
    return np.frombuffer(out.loss_fn_outputs[0].fields["logprobs"].data, np.float32), dict(out.metrics)


def _weights(fleet, adapter):
    return torch.cat([p[idx].detach().flatten().float() for _, p, idx in fleet.adapter_views(adapter)])


def _rel(a, b):
    a, b = torch.tensor(np.array(a)), torch.tensor(np.array(b))
    return float((a - b).norm() / b.norm())


def test_piece_ranges_are_whole_datums_within_the_bound():
    assert piece_ranges([10, 10, 10, 50, 10], 60, False, False) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert piece_ranges([10, 10, 10], 1000, False, False) == [(0, 3)]
    assert piece_ranges([5, 5, 5, 5, 5, 5], 15, True, True) == [(0, 2), (2, 4), (4, 6)]  # pairs stay together
    assert piece_ranges([5, 5, 5, 5, 5, 5], 5, True, True) == [(0, 2), (2, 4), (4, 6)]  # a pair over the bound


def test_a_small_request_runs_while_a_large_forward_backward_is_in_pieces(sched):
    s = sched(_fleet(), fair_share_tokens=192, max_step_tokens=192)  # one 64-token datum a piece, a cycle
    big = _fwdbwd(s, "big", "m", 1, _datums(16, 64))
    deadline = time.monotonic() + T
    while s.stats.get("fwd_pieces", 0) < 1:
        assert time.monotonic() < deadline, "the big forward_backward never started"
        time.sleep(0.001)
    assert s.queued() >= 1  # a split request counts as queued work (drain, shutdown, queue depth)
    small = _fwdbwd(s, "small", "n", 1, _datums(1, 4, adapter="b"))
    assert isinstance(s.futures.wait_sync(small, T), Result)
    done = s.stats["fwd_pieces"]
    assert s.futures.peek(big) is None and done < 8, f"the small request waited for {done} of 16 pieces"
    assert isinstance(s.futures.wait_sync(big, T), Result)
    assert s.stats["fwd_pieces"] == 16


def test_split_result_and_weights_equal_the_uncut_call_and_optim_step_waits(sched):
    examples = _datums(6, 24, seed=1)
    runs = {}
    for bound in (0, 80):  # 0: one call, as before; 80: 6 pieces of one datum (3 x 24 = 72 each)
        fleet = _fleet()
        s = sched(fleet, fair_share_tokens=80, max_step_tokens=bound)
        s.pause()  # sent together: the optim_step is queued right behind the big forward_backward
        fb = _fwdbwd(s, "t", "m", 1, examples)
        step = _optim_step(s, "t", "m", 2, "a")
        s.resume()
        fb_res, step_res = s.futures.wait_sync(fb, T), s.futures.wait_sync(step, T)
        assert isinstance(fb_res, Result) and isinstance(step_res, Result), (fb_res, step_res)
        runs[bound] = (*_decoded(fb_res), step_res.json["grad_norm"], _weights(fleet, "a"), s.stats.get("fwd_pieces"))
    (lp0, m0, g0, w0, p0), (lp1, m1, g1, w1, p1) = runs[0], runs[80]
    assert p0 is None and p1 == 6
    assert _rel(lp1, lp0) <= 1e-5
    assert m1.keys() == m0.keys() and m1["num_tokens:sum"] == m0["num_tokens:sum"]
    assert m1["loss:sum"] == pytest.approx(m0["loss:sum"], rel=1e-5)
    # the optim_step applied the whole gradient: had it run after some pieces, the norm and weights would differ
    assert g1 == pytest.approx(g0, rel=1e-5)
    assert _rel(w1, w0) <= 1e-5 and _rel(w1 - _weights(_fleet(), "a"), w0 - _weights(_fleet(), "a")) <= 1e-4


def test_the_pieces_are_the_micro_batches_bit_for_bit(sched):
    examples = _datums(5, 16, seed=2)
    fleet = _fleet()
    s = sched(fleet, fair_share_tokens=100, max_step_tokens=100)  # 2 datums (96) a piece
    res = s.futures.wait_sync(_fwdbwd(s, "t", "m", 1, examples), T)
    lp, metrics = _decoded(res)
    ref = _fleet()
    parts = [ref.forward_backward(examples[a:b]) for a, b in piece_ranges([16] * 5, 100, False, False)]
    assert len(parts) == 3 and s.stats["fwd_pieces"] == 3
    assert lp.tobytes() == np.concatenate([np.asarray(x, np.float32) for p in parts for x in p.logprobs]).tobytes()
    assert metrics["loss:sum"] == float(sum(x for p in parts for x in p.losses))
    for g, h in zip(fleet.adapter_grads("a"), ref.adapter_grads("a")):
        assert torch.equal(g, h)


def test_a_bad_datum_anywhere_refuses_the_whole_request(sched):
    fleet = _fleet()
    before = _weights(fleet, "a")
    s = sched(fleet, fair_share_tokens=60, max_step_tokens=60)
    examples = _datums(6, 16, seed=3)
    examples[-1] = lf.Example("a", examples[-1].input_tokens, [10**6] * 16, weights=[1.0] * 16)  # out of vocab
    s.pause()
    bad = _fwdbwd(s, "t", "m", 1, examples)
    step = _optim_step(s, "t", "m", 2, "a")
    s.resume()
    got = s.futures.wait_sync(bad, T)
    assert isinstance(got, Failure) and got.category == "user" and "example 5" in got.error, got
    assert s.stats.get("fwd_pieces", 0) == 0 and fleet.pending_adapters() == []
    assert isinstance(s.futures.wait_sync(step, T), Result)  # the model goes on
    assert torch.equal(_weights(fleet, "a"), before)  # a zero gradient: nothing applied


def test_a_piece_failing_midway_leaves_no_gradient_for_the_next_optim_step(sched):
    fleet = _fleet()
    before = _weights(fleet, "a")
    real, calls = fleet.forward_backward, []

    def flaky(examples, *a, **kw):
        calls.append(len(examples))
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(examples, *a, **kw)

    fleet.forward_backward = flaky
    s = sched(fleet, fair_share_tokens=60, max_step_tokens=60)
    s.pause()
    fb = _fwdbwd(s, "t", "m", 1, _datums(5, 16, seed=4))
    step = _optim_step(s, "t", "m", 2, "a")
    s.resume()
    got = s.futures.wait_sync(fb, T)
    assert isinstance(got, Failure) and got.category == "server" and "after 2 of 5" in got.error, got
    assert isinstance(s.futures.wait_sync(step, T), Result)
    assert torch.equal(_weights(fleet, "a"), before), "the two pieces run before the failure reached the step"
    assert len(calls) == 3


def test_two_tenants_large_requests_share_their_pieces_calls(sched):
    fleet, ref = _fleet(), _fleet()
    s = sched(fleet, fair_share_tokens=150, max_step_tokens=150)  # 3 pieces of 2 datums (144) each
    xa, xb = _datums(6, 24, "a", seed=5), _datums(6, 24, "b", seed=6)
    s.pause()
    ra, rb = _fwdbwd(s, "t1", "m", 1, xa), _fwdbwd(s, "t2", "n", 1, xb)
    s.resume()
    got = {k: _decoded(s.futures.wait_sync(r, T)) for k, r in (("a", ra), ("b", rb))}
    assert s.stats["fwd_pieces"] == 6 and s.stats["fwdbwd_calls"] < 6 and s.stats["max_tenants_per_step"] == 2
    for name, xs in (("a", xa), ("b", xb)):
        uncut = ref.forward_backward(xs)
        assert _rel(got[name][0], np.concatenate([np.asarray(x, np.float32) for x in uncut.logprobs])) <= 1e-5
        assert got[name][1]["loss:sum"] == pytest.approx(sum(uncut.losses), rel=1e-5)
        assert _rel(torch.cat([g.flatten() for g in fleet.adapter_grads(name)]),
                    torch.cat([g.flatten() for g in ref.adapter_grads(name)])) <= 1e-5
