"""Finite or refused (issue 13): one bad number must never break an adapter, and a malformed
input is a ValueError naming the problem before anything runs.

- non-finite ``weights`` / ``advantages`` / ``logprobs`` are refused before any work;
- non-finite optimizer settings are refused at `OptimConfig` and at `set_optimizer`;
- an adapter whose gradient holds an inf/nan is skipped at `optim_step` in every dtype (weights,
  moments and step untouched, reported as ``skipped``); the other adapters step;
- token ids are integers in range, ``adapters`` is a list (not a string), batches are not empty,
  `add_adapter` either succeeds or changes nothing, sampling and loss options are finite.
"""

import math

import pytest
import torch

import lorafleet as lf
import lorafleet.engine.fleet as fleet_mod
from lorafleet.engine import OptimConfig
from lorafleet.engine.losses import resolve_config
from lorafleet.models.debug import build_debug_model

torch.set_num_threads(1)
NAN, INF = float("nan"), float("inf")
VOCAB = 256  # the debug models' vocabulary


def make_fleet(dtype=None, names="ab"):
    f = lf.Fleet(build_debug_model("llama", seed=0, dtype=dtype), max_adapters=4, max_rank=8)
    for i, n in enumerate(names):
        f.add_adapter(n, lf.AdapterConfig(rank=4, alpha=8, seed=i))
    return f


def ex(adapter, n=5, start=3, **kw):
    toks = list(range(start, start + n + 1))
    return lf.Example(adapter, toks[:-1], toks[1:], **kw)


def snapshot(fleet, name):
    return {k: t.clone() for k, t in fleet.get_adapter_weights(name).tensors()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grads_zero(fleet, name):
    return all(not g.any() for g in fleet.adapter_grads(name))


# ------------------------------------------------------------------ example fields
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("field, loss_fn", [("weights", "cross_entropy"), ("advantages", "importance_sampling"),
                                            ("logprobs", "ppo"), ("weights", "dpo")])
def test_nonfinite_example_field_is_refused_before_anything_runs(field, loss_fn, bad):
    f = make_fleet()
    arrays = {"logprobs": [-1.0] * 5, "advantages": [0.5] * 5} if loss_fn not in ("cross_entropy", "dpo") else {}
    good = [ex("a", **arrays), ex("a", start=9, **arrays)]
    vals = [1.0, 2.0, bad, 0.5, 1.0] if field != "logprobs" else [-1.0, -2.0, bad, -0.5, -1.0]
    broken = ex("a", start=20, **{**arrays, field: vals})
    batch = good + [broken, ex("a", start=30, **arrays)]  # the bad one is example 2
    before = snapshot(f, "a")
    with pytest.raises(ValueError, match=rf"example 2: {field}\[2\] is {bad!r}"):
        f.forward_backward(batch, loss_fn)
    assert f.pending_adapters() == [] and grads_zero(f, "a")  # nothing ran
    assert f.optim_step() == {} and same(before, snapshot(f, "a"))
    with pytest.raises(ValueError, match=rf"example 2: {field}"):  # forward_only is checked too
        f.forward_backward(batch, loss_fn, forward_only=True)


def test_non_numeric_example_field_is_a_value_error():
    f = make_fleet()
    with pytest.raises(ValueError, match=r"example 0: weights\[1\] is 'x'"):
        f.forward_backward([ex("a", weights=[1.0, "x", 1.0, 1.0, 1.0])])


# ---------------------------------------------------------------- optimizer settings
@pytest.mark.parametrize("field, value", [("weight_decay", NAN), ("grad_clip_norm", NAN), ("weight_decay", INF),
                                          ("grad_clip_norm", INF), ("eps", NAN), ("lr", NAN), ("lr", INF),
                                          ("min_lr_ratio", NAN), ("warmup_steps", NAN), ("total_steps", INF),
                                          ("lr", True), ("betas", (0.9, NAN)), ("warmup_steps", 2.5)])
def test_nonfinite_optimizer_setting_is_refused(field, value):
    with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
        OptimConfig(**{field: value})


def test_set_optimizer_refuses_a_config_made_nonfinite_after_construction():
    f = make_fleet()
    good = OptimConfig(lr=1e-2)
    f.set_optimizer("a", good)
    for field in ("weight_decay", "grad_clip_norm", "eps"):
        cfg = OptimConfig(lr=1e-2)
        setattr(cfg, field, NAN)
        with pytest.raises(ValueError, match=f"OptimConfig.{field} must be a finite number"):
            f.set_optimizer("a", cfg)
        assert f.train_state("a").optim is good  # the adapter keeps its config
    assert OptimConfig(warmup_steps=10.0).warmup_steps == 10  # integral values are read as ints


# --------------------------------------------------------- non-finite gradient skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_gradient_skips_that_adapter_in_every_dtype(dtype):
    f = make_fleet(dtype)
    f.set_optimizer("a", OptimConfig(lr=1e-2))
    f.set_optimizer("b", OptimConfig(lr=1e-2))
    for n in "ab":  # one clean step each, so the moments and masters are not empty
        f.forward_backward([ex(n)])
    assert not any(o["skipped"] for o in f.optim_step().values())
    st_a = f.train_state("a")
    adam_before = (st_a.adam.step, {k: v.clone() for k, v in st_a.adam.exp_avg.items()},
                   {k: v.clone() for k, v in st_a.adam.exp_avg_sq.items()},
                   {k: v.clone() for k, v in st_a.adam.master.items()})
    scale_before = st_a.scaler.scale if st_a.scaler is not None else None
    w_a, w_b = snapshot(f, "a"), snapshot(f, "b")
    # a's gradient turns nan (a plain backward through `forward`, where no Example check applies);
    # b's is an ordinary one from forward_backward
    out = f.forward(torch.tensor([[3, 4, 5, 6]] * 2), adapters=["a", "a"])
    (out.logits.float().sum() * NAN).backward()
    f.forward_backward([ex("b")])
    assert not all(torch.isfinite(g).all() for g in f.adapter_grads("a"))
    res = f.optim_step(["a", "b"])
    assert res["a"]["skipped"] is True and res["b"]["skipped"] is False
    assert math.isnan(res["a"]["grad_norm"]) and math.isfinite(res["b"]["grad_norm"])
    assert res["a"]["step"] == 1 and res["b"]["step"] == 2
    assert same(w_a, snapshot(f, "a"))  # never written
    assert (st_a.adam.step, st_a.adam.exp_avg.keys(), st_a.adam.master.keys()) == \
        (adam_before[0], adam_before[1].keys(), adam_before[3].keys())
    for now, then in zip((st_a.adam.exp_avg, st_a.adam.exp_avg_sq, st_a.adam.master), adam_before[1:]):
        assert all(torch.equal(now[k], then[k]) for k in then)
    w_b_after = snapshot(f, "b")
    assert not same(w_b, w_b_after) and all(torch.isfinite(t).all() for t in w_b_after.values())
    assert not st_a.pending and grads_zero(f, "a")  # the bad gradient is dropped
    if scale_before is not None:  # fp16: the loss scale also backs off, as for an overflow
        assert res["a"]["loss_scale"] == scale_before / 2
    f.forward_backward([ex("a")])  # and a steps again on a clean gradient
    again = f.optim_step(["a"])["a"]
    assert not again["skipped"] and again["step"] == 2
    assert all(torch.isfinite(t).all() for t in snapshot(f, "a").values())


# ----------------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad", [VOCAB, 10_000, -1])
def test_input_ids_out_of_range_are_refused(bad):
    f = make_fleet()
    with pytest.raises(ValueError, match=rf"example 1: input token ids must be in \[0, {VOCAB}\), got {bad}"):
        f.forward_backward([ex("a"), lf.Example("a", [3, bad, 4], [4, 5, 6])])
    with pytest.raises(ValueError, match=rf"example 0: target token ids must be in \[0, {VOCAB}\), got {bad}"):
        f.forward_backward([lf.Example("a", [3, 4, 5], [4, bad, 6])])
    with pytest.raises(ValueError, match=rf"input_ids token ids must be in \[0, {VOCAB}\), got {bad}"):
        f.forward(torch.tensor([[3, 4], [5, bad]]), adapters=["a", None])
    with pytest.raises(ValueError, match=rf"request 0: prompt token ids must be in \[0, {VOCAB}\)"):
        f.sample([lf.SampleRequest("a", [3, bad])], lf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {VOCAB}\), got {bad}"):
        f.compute_logprobs("a", [3, bad])
    with pytest.raises(ValueError, match="token ids must be in"):
        f.compute_logprobs("a", [bad])  # a single token is checked too
    assert f.pending_adapters() == [] and grads_zero(f, "a")


@pytest.mark.parametrize("bad", [5.7, 5.0, True])
def test_float_and_bool_tokens_are_refused_not_truncated(bad):
    f = make_fleet()
    with pytest.raises(ValueError, match=rf"example 0: input token ids must be integers, got {bad!r}"):
        f.forward_backward([lf.Example("a", [3, bad, 4], [4, 5, 6])])
    with pytest.raises(ValueError, match=rf"example 0: target token ids must be integers, got {bad!r}"):
        f.forward_backward([lf.Example("a", [3, 4, 5], [4, bad, 6])])
    with pytest.raises(ValueError, match="request 0: prompt token ids must be integers"):
        f.sample([lf.SampleRequest("a", [3, bad])], lf.SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids must be integers"):
        f.compute_logprobs("a", [3, bad, 4])
    for t in (torch.tensor([[3.0, 5.7]]), torch.tensor([[True, False]])):
        with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
            f.forward(t)
    assert f.pending_adapters() == []
    # numpy / torch integer types are integers
    np = pytest.importorskip("numpy")
    f.forward_backward([lf.Example("a", list(np.array([3, 4, 5])), [4, 5, 6])], forward_only=True)
    f.forward(torch.tensor([[3, 4]], dtype=torch.int32))


# ----------------------------------------------------------------------- empty batches
def test_empty_batches():
    """forward_backward([]) and a forward without rows or positions are ValueErrors; sample([])
    is the well-defined empty result []."""
    f = make_fleet()
    with pytest.raises(ValueError, match="at least one example"):
        f.forward_backward([])
    with pytest.raises(ValueError, match="input_ids is empty"):
        f.forward(torch.zeros(0, 4, dtype=torch.long), adapters=[])
    with pytest.raises(ValueError, match="input_ids is empty"):
        f.forward(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_tokens is empty"):
        lf.SampleRequest("a", [])
    assert f.sample([]) == []
    with pytest.raises(ValueError, match="list of Examples"):
        f.forward_backward(ex("a"))


# ------------------------------------------------------------ list, not string
def test_adapters_must_be_a_list_not_a_string():
    f = make_fleet()
    with pytest.raises(ValueError, match="adapters must be a list .* got the string 'ab'"):
        f.forward(torch.tensor([[3, 4], [5, 6]]), adapters="ab")
    f.forward_backward([ex("a"), ex("b")])
    w = snapshot(f, "a"), snapshot(f, "b")
    with pytest.raises(ValueError, match=r"optim_step takes a list of adapter names, got the string 'ab'"):
        f.optim_step("ab")
    with pytest.raises(ValueError, match="'a' is named twice"):
        f.optim_step(["a", "b", "a"])
    with pytest.raises(ValueError, match="adapter names are strings"):
        f.optim_step([["a"]])
    assert sorted(f.pending_adapters()) == ["a", "b"]  # nothing stepped, nothing dropped
    assert same(w[0], snapshot(f, "a")) and same(w[1], snapshot(f, "b"))
    assert f.train_state("a").adam.step == f.train_state("b").adam.step == 0
    assert set(f.optim_step(["a", "b"])) == {"a", "b"}


# ------------------------------------------------------------------ add_adapter
@pytest.mark.parametrize("field, value", [("seed", "x"), ("seed", 1.5), ("seed", True), ("seed", 2**64),
                                          ("experts", "no"), ("use_rslora", 1), ("alpha", True),
                                          ("target_modules", 5)])
def test_adapter_config_is_checked_before_a_slot_is_taken(field, value):
    f = make_fleet()
    before = (list(f.adapters), list(f.bank.slots))
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}"):
        f.add_adapter("c", lf.AdapterConfig(rank=4, **{field: value}))
    assert (list(f.adapters), list(f.bank.slots)) == before


def test_add_adapter_rolls_back_on_an_error_during_slot_init(monkeypatch):
    f = make_fleet(names="a")
    slots_before = list(f.bank.slots)
    real, calls = fleet_mod.kaiming_uniform_A, []

    def failing(*a, **k):  # a few modules are initialised, then the init fails
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(fleet_mod, "kaiming_uniform_A", failing)
    with pytest.raises(RuntimeError, match="boom"):
        f.add_adapter("c", lf.AdapterConfig(rank=4, seed=7))
    assert list(f.adapters) == ["a"] and list(f.bank.slots) == slots_before
    assert "c" not in f._train and "c" not in f._configs
    slot = f.bank.free_slot()
    for m in f._att.lora_modules():  # the slot is zero and disabled again
        assert not m.enabled[slot]
        assert all(not p[slot].any() for p in m.parameters(recurse=False))
    monkeypatch.setattr(fleet_mod, "kaiming_uniform_A", real)
    assert f.add_adapter("c", lf.AdapterConfig(rank=4, seed=7)) == slot  # the name and slot are free
    fresh = make_fleet(names="")
    fresh.add_adapter("c", lf.AdapterConfig(rank=4, seed=7), slot=slot)
    assert same(snapshot(f, "c"), snapshot(fresh, "c"))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_adapter_weights_are_refused(bad):
    """add_adapter_from_weights / set_adapter_weights refuse a NaN or inf factor, naming it, and
    change nothing."""
    f = make_fleet()
    w = f.get_adapter_weights("a")
    key = next(k for k, _ in w.tensors() if k.endswith(".B"))
    dict(w.tensors())[key][0, 0] = bad
    before = snapshot(f, "a")
    with pytest.raises(ValueError, match=f"adapter 'a': tensor {key} has non-finite values"):
        f.set_adapter_weights("a", w)
    assert same(before, snapshot(f, "a"))
    with pytest.raises(ValueError, match=f"adapter 'c': tensor {key} has non-finite values"):
        f.add_adapter_from_weights("c", w)
    assert list(f.adapters) == ["a", "b"]


# --------------------------------------------------------------- sampling params
@pytest.mark.parametrize("field, value", [("temperature", NAN), ("temperature", INF), ("top_p", NAN),
                                          ("temperature", "1"), ("top_k", 2.5), ("max_tokens", True),
                                          ("seed", 1.5)])
def test_sampling_params_must_be_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        lf.SamplingParams(**{field: value})


# ---------------------------------------------------------------- loss options
@pytest.mark.parametrize("loss_fn, cfg, match", [
    ("ppo", {"clip_low_threshold": True}, "expected a number, got True"),
    ("ppo", {"clip_high_threshold": NAN}, "expected a finite number, got nan"),
    ("cispo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "clip_low_threshold 1.5 is above"),
    ("dpo", {"beta": 0.0}, "beta must be a finite number > 0"),
    ("dpo", {"beta": -1}, "beta must be a finite number > 0"),
    ("dpo", {"beta": INF}, "expected a finite number"),
    ("dpo", {"beta": NAN}, "expected a finite number"),
])
def test_loss_fn_config_is_checked(loss_fn, cfg, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(loss_fn, cfg)


def test_loss_fn_config_inf_clip_is_no_bound():
    assert resolve_config("ppo", {"clip_high_threshold": INF, "clip_low_threshold": 0}) == \
        {"clip_low_threshold": 0.0, "clip_high_threshold": INF}
    f = make_fleet()
    arrays = {"logprobs": [-1.0] * 5, "advantages": [0.5] * 5}
    with pytest.raises(ValueError, match="loss_fn_config.clip_low_threshold"):
        f.forward_backward([ex("a", **arrays)], "ppo", {"clip_low_threshold": NAN})
    assert f.pending_adapters() == []
    res = f.forward_backward([ex("a", **arrays)], "ppo", {"clip_high_threshold": INF})
    assert all(math.isfinite(v) for v in res.losses)


# ----------------------------------------------- distributed: every rank skips alike
def _ep_nan_on_one_rank(rank, world):
    """EP=2: an inf/nan in one local expert shard of adapter "a" on rank 0 only. The shard's
    gradient is summed over nobody (no other rank holds it), so only rank 0 sees the nan; the
    global norm spans every shard, so both ranks must skip "a" and step "b"."""
    from distributed_helpers import examples, init
    from lorafleet.distributed.shards import view_shard

    fleet = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=2, max_rank=4)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, expert_sharing="none", seed=1))
    fleet.add_adapter("b", lf.AdapterConfig(rank=4, expert_sharing="none", seed=2))
    init({"expert_parallel_degree": 2}, fleet)
    fleet.forward_backward(examples(["a", "b"], 0, 2))
    if rank == 0:
        key, p, idx = next(v for v in fleet.adapter_views("a") if view_shard(fleet, "a", v[0], v[1]) is not None)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad[idx].view(-1)[0] = NAN
    before = {n: {k: p[idx].clone() for k, p, idx in fleet.adapter_views(n)} for n in "ab"}
    out = fleet.optim_step(["a", "b"])
    after = {n: {k: p[idx].clone() for k, p, idx in fleet.adapter_views(n)} for n in "ab"}
    return {"out": out, "a_same": same(before["a"], after["a"]), "b_same": same(before["b"], after["b"]),
            "steps": {n: fleet.train_state(n).adam.step for n in "ab"},
            "b": dict(fleet.get_adapter_weights("b").tensors())}


def test_distributed_ranks_agree_on_a_nonfinite_shard(tmp_path):
    from distributed_helpers import spawn

    r0, r1 = spawn(_ep_nan_on_one_rank, 2, tmp_path, timeout=180)
    for r in (r0, r1):
        assert r["out"]["a"]["skipped"] is True and r["out"]["b"]["skipped"] is False
        assert r["a_same"] and not r["b_same"] and r["steps"] == {"a": 0, "b": 1}
        assert not math.isfinite(r["out"]["a"]["grad_norm"])
    assert same(r0["b"], r1["b"])  # b's gathered weights are the same on both ranks
