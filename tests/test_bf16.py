"""bf16 training path: a Fleet on a bf16 base computes base and LoRA in bf16 (logprobs and losses in
fp32), keeps AdamW moments and fp32 master copies of the factors in the optimizer state, tracks the
same fleet in fp32, does not lose updates below half a bf16 ulp, and checkpoints bitwise.

The fp32 reference is the same fleet with every weight the bf16 value upcast. On MoE models the
reference replays the bf16 run's expert choices (`pin_routing`): a top-k near-tie that bf16 noise
flips is a discrete change of the computation, not a precision error, and one flip on a toy batch
moves an expert's gradient by tens of percent. Routing weights stay differentiable fp32.
"""

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import lorafleet as lf
from lorafleet.engine.optim import AdamState, OptimConfig, adamw_step
from lorafleet.models.debug import build_debug_model, router_modules
from peft_ref import rel
from random_examples import random_examples as batch

torch.set_num_threads(1)
BF16, V = torch.bfloat16, 256
# mixed ranks, targets and expert modes in one batch
CONFIGS = {
    "a": lf.AdapterConfig(rank=4, alpha=8, seed=1),
    "b": lf.AdapterConfig(rank=8, alpha=8, seed=2, target_modules=["q_proj", "v_proj"], expert_sharing="shared_a"),
    "c": lf.AdapterConfig(rank=2, alpha=4, seed=3, expert_sharing="shared_outer"),
    "d": lf.AdapterConfig(rank=3, alpha=3, seed=4, experts=False, target_modules=["o_proj", "k_proj"]),
}


def pin_routing(f16, f32):
    """Record the bf16 routers' top-k choices; the fp32 routers use them (in call order)."""
    queues = defaultdict(list)
    r16, r32 = router_modules(f16.model), router_modules(f32.model)
    for path, r in r16.items():
        r.register_forward_hook(lambda m, args, out, path=path: queues[path].append(out[2]))

    def replay(router, path):
        def forward(hidden):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            idx = queues[path].pop(0)
            top = probs.gather(1, idx)
            if router.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return forward

    for path, r in r32.items():
        r.forward = replay(r, path)


def fleet_pair(arch="qwen3_moe", names="abcd", pin=True):
    """A bf16 fleet and the same fleet in fp32 (every weight the bf16 value, upcast). Run the bf16
    fleet first on each input when ``pin`` (MoE): the fp32 one replays its routing."""
    base = build_debug_model(arch, seed=0).to(BF16)
    f32 = lf.Fleet(copy.deepcopy(base).float(), max_adapters=4, max_rank=8)
    f16 = lf.Fleet(base, max_adapters=4, max_rank=8)
    for i, n in enumerate(names):
        f16.add_adapter(n, CONFIGS[n])
        f32.add_adapter(n, CONFIGS[n])
        g = torch.Generator().manual_seed(10 + i)
        w = f16.get_adapter_weights(n, dtype=BF16)
        for k, t in w.tensors():
            if k.endswith(".B"):  # non-zero B so gradients reach A too
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        f16.set_adapter_weights(n, w)
        f32.set_adapter_weights(n, w)  # bf16 values, exactly representable in fp32
    if pin and f16.spec.moe:
        pin_routing(f16, f32)
    return f16, f32


def grads(fleet, name):
    return torch.cat([g.float().flatten() for g in fleet.adapter_grads(name)])


def weights(fleet, name):
    return {k: t.clone() for k, t in fleet.get_adapter_weights(name).tensors()}


# ------------------------------------------------------------------ (a) numerics vs fp32
@pytest.mark.parametrize("arch,names", [("qwen3_moe", "abcd"), ("qwen3", "abd")])
def test_logits_and_grads_match_fp32(arch, names):
    f16, f32 = fleet_pair(arch, names)
    ids = torch.randint(3, V, (len(names) + 1, 9), generator=torch.Generator().manual_seed(0))
    rows = [None, *names][::-1]
    with torch.no_grad():
        l16 = f16.forward(ids, adapters=rows).logits
        l32 = f32.forward(ids, adapters=rows).logits
    assert l16.dtype == BF16
    err = {"logits": rel(l16, l32)}
    ex = batch(names, 1)
    r16, r32 = f16.forward_backward(ex), f32.forward_backward(ex)
    err["loss"] = rel(torch.tensor(r16.losses), torch.tensor(r32.losses))
    for n in names:
        assert all(g.dtype == torch.float32 for g in f16.adapter_grads(n))  # the fp32 accumulator
        err[f"grad {n}"] = rel(grads(f16, n), grads(f32, n))
    print(arch, {k: f"{v:.1e}" for k, v in err.items()})
    assert max(err.values()) <= 1e-2, err


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dpo"])
def test_every_loss_in_bf16(loss_fn):
    f16, f32 = fleet_pair("qwen3_moe", "ab")
    ex = batch("ab", 2, arrays=loss_fn != "dpo")
    r16, r32 = f16.forward_backward(ex, loss_fn), f32.forward_backward(ex, loss_fn)
    lp16 = torch.tensor(sum(r16.logprobs, []), dtype=torch.float64)
    err = {"logprobs": rel(lp16, torch.tensor(sum(r32.logprobs, [])))}
    err.update({n: rel(grads(f16, n), grads(f32, n)) for n in "ab"})
    print(loss_fn, {k: f"{v:.1e}" for k, v in err.items()})
    # signed advantages: each gradient is a difference of larger terms, so its relative error is
    # somewhat above cross-entropy's (measured 0.8-1.1e-2)
    assert max(err.values()) <= 2e-2, err


# ------------------------------------------------------------------ (b) optimizer state dtypes
def test_moments_and_master_weights_are_fp32():
    f16, _ = fleet_pair("qwen3_moe", "bc")
    f16.forward_backward(batch("bc", 3))
    f16.optim_step()
    for n in "bc":
        adam = f16.train_state(n).adam
        views = f16.adapter_views(n)
        assert set(adam.master) == set(adam.exp_avg) == {k for k, _, _ in views}
        for k, p, idx in views:
            assert p.dtype == BF16
            assert adam.exp_avg[k].dtype == adam.exp_avg_sq[k].dtype == adam.master[k].dtype == torch.float32
            assert torch.equal(adam.master[k].to(BF16), p[idx])  # the bank holds the rounded master
    # an fp32 bank needs no master copy
    f32 = lf.Fleet(build_debug_model("qwen3", seed=0), max_adapters=1, max_rank=4)
    f32.add_adapter("x", lf.AdapterConfig(rank=4))
    f32.forward_backward(batch("x", 3))
    f32.optim_step()
    assert f32.train_state("x").adam.master == {}


# ------------------------------------------------------------------ (c) training tracks fp32
def test_training_tracks_fp32():
    f16, f32 = fleet_pair("qwen3", "abd")
    opt = OptimConfig(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01, grad_clip_norm=1.0)
    for n in "abd":
        f16.set_optimizer(n, opt)
        f32.set_optimizer(n, opt)
    data = batch("abd", 5, n=2)
    losses = []
    for _ in range(8):
        r16, r32 = f16.forward_backward(data), f32.forward_backward(data)
        losses.append((sum(r16.losses), sum(r32.losses)))
        f16.optim_step()
        f32.optim_step()
    first, last = losses[0][1], losses[-1][1]
    print("loss bf16 / fp32:", [f"{a:.3f}/{b:.3f}" for a, b in losses])
    assert last < 0.9 * first  # it learns
    assert all(abs(a - b) <= 0.02 * b for a, b in losses)


def test_tiny_updates_accumulate_in_the_master():
    """lr 1e-4 on weights of 1.0: each step is ~1/80 of a bf16 ulp (2^-7). Stepping the bf16 value
    would round every update away; the fp32 master equals plain fp32 AdamW bitwise, and the bank
    moves once the master has drifted past half an ulp."""
    cfg = OptimConfig(lr=1e-4)
    p16, p32 = torch.ones(4, 8, dtype=BF16), torch.ones(4, 8)
    s16, s32 = AdamState(), AdamState()
    grad = torch.full((4, 8), 0.5, dtype=BF16)
    for _ in range(60):
        adamw_step([("w", p16)], [grad], s16, cfg)
        adamw_step([("w", p32)], [grad.float()], s32, cfg)
    assert torch.equal(s16.master["w"], p32)
    assert abs(float(p32[0, 0]) - (1 - 60e-4)) < 1e-5
    assert torch.equal(p16, p32.to(BF16)) and float(p16[0, 0]) == 1 - 2**-7
    # a master that no longer matches the bank (weights written from outside) is re-seeded
    p16.fill_(0.5)
    adamw_step([("w", p16)], [grad], s16, cfg)
    assert abs(float(s16.master["w"][0, 0]) - (0.5 - 1e-4)) < 1e-6


def test_set_adapter_weights_keeps_fp32_precision_in_master():
    f16, _ = fleet_pair("qwen3", "a", pin=False)
    w = f16.get_adapter_weights("a")  # qwen3: dense factors only
    w.dense = {p: (a.float() + 1e-4, b.float() + 1e-4) for p, (a, b) in w.dense.items()}  # not bf16 values
    w32 = {k: t.clone() for k, t in w.tensors()}
    f16.set_adapter_weights("a", w)
    master = f16.train_state("a").adam.master
    assert all(torch.equal(master[k], w32[k]) for k in w32)


def test_accumulation_across_calls_is_fp32():
    """K micro-batches in K forward_backward calls: the accumulated gradient is the fp32 sum of the
    per-call bf16 gradients, bitwise (summed in the bf16 bank it was 6.7e-3 off the fp64 sum at
    K=32), and the step equals AdamW on that sum. One call's gradient is the bf16 one, exactly."""
    K = 32
    acc, ref = fleet_pair("qwen3", "ab", pin=False)[0], fleet_pair("qwen3", "ab", pin=False)[0]
    seq32 = s64 = s16 = None
    for s in range(K):
        ex = batch("ab", 100 + s, n=1)
        acc.forward_backward(ex)
        ref.forward_backward(ex)
        g = ref.adapter_grads("a")  # this call's gradient alone: the bf16 bank values, upcast
        assert all(torch.equal(t, t.to(BF16).float()) for t in g)
        if seq32 is None:
            seq32, s64, s16 = [t.clone() for t in g], [t.double() for t in g], [t.to(BF16) for t in g]
        else:
            for i, t in enumerate(g):
                seq32[i] += t
                s64[i] += t.double()
                s16[i] += t.to(BF16)  # what accumulating in the bf16 .grad did
        ref.zero_grad("a")
        ref.zero_grad("b")
    got = acc.adapter_grads("a")
    assert all(g.dtype == torch.float32 for g in got)
    assert all(torch.equal(a, b) for a, b in zip(got, seq32))
    flat = lambda ts: torch.cat([t.double().flatten() for t in ts])  # noqa: E731
    err_new, err_old = rel(flat(got), flat(s64)), rel(flat(s16), flat(s64))
    print(f"accumulation error vs fp64 sum: fp32 {err_new:.1e}, bf16 {err_old:.1e}")
    assert err_new < 1e-6 < 1e-4 < err_old
    # the step reads the fp32 sum; the bank's .grad holds nothing once moved
    views = ref.adapter_views("a")
    adamw_step([(k, p[idx]) for k, p, idx in views], seq32, ref.train_state("a").adam, ref.train_state("a").optim)
    acc.optim_step(["a"])
    assert all(p.grad is None or not p.grad[idx].any() for _, p, idx in acc.adapter_views("a"))
    assert acc.train_state("a").grad_acc == {} and acc.train_state("b").grad_acc  # "b" still pending
    a, b = weights(acc, "a"), weights(ref, "a")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ (d) checkpoints
def test_save_load_state_continues_bitwise(tmp_path):
    f16, _ = fleet_pair("qwen3_moe", "bc", pin=False)
    opt = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=1, total_steps=6, grad_clip_norm=0.5)
    f16.set_optimizer("b", opt)
    data = [batch("b", s) for s in range(4)]
    for s in range(2):
        f16.forward_backward(data[s])
        f16.optim_step(["b"])
    f16.forward_backward(data[2])  # pending bf16 gradients go into the checkpoint too
    f16.save_state("b", tmp_path / "b")
    other = lf.Fleet(build_debug_model("qwen3_moe", seed=0).to(BF16), max_adapters=4, max_rank=8)
    other.add_adapter("z", CONFIGS["c"])  # a neighbour, so "b" lands in another slot
    other.load_state("b", tmp_path / "b")
    for fl in (f16, other):
        fl.optim_step(["b"])
        fl.forward_backward(data[3])
        fl.optim_step(["b"])
    a, b = weights(f16, "b"), weights(other, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = f16.train_state("b").adam, other.train_state("b").adam
    assert sa.step == sb.step == 4
    for d in ("master", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(getattr(sa, d)[k], getattr(sb, d)[k]) for k in a), d
    # an fp32 fleet loading the bf16 checkpoint takes the masters as its weights
    f16.save_state("b", tmp_path / "b2")
    f32 = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=1, max_rank=8)
    f32.load_state("b", tmp_path / "b2")
    w32 = weights(f32, "b")
    assert f32.train_state("b").adam.master == {}
    assert all(torch.equal(w32[k], sa.master[k]) for k in a)


# ------------------------------------------------------------------ (e) exports carry the masters
def trained_bf16(arch="qwen3_moe", names="bc", steps=3):
    f16, _ = fleet_pair(arch, names, pin=False)
    for n in names:
        f16.set_optimizer(n, OptimConfig(lr=1e-4))  # sub-ulp steps: masters and bank differ
    for s in range(steps):
        f16.forward_backward(batch(names, 20 + s))
        f16.optim_step()
    return f16


def test_exports_carry_fp32_masters(tmp_path):
    from safetensors.torch import load_file

    f16 = trained_bf16()
    for n in "bc":
        views, master = f16.adapter_views(n), f16.train_state(n).adam.master
        w = dict(f16.get_adapter_weights(n).tensors())
        assert all(t.dtype == torch.float32 and torch.equal(t, master[k]) for k, t in w.items())
        assert any(not torch.equal(master[k], p[idx].float()) for k, p, idx in views)  # precision the bank lacks
        w16 = dict(f16.get_adapter_weights(n, dtype=BF16).tensors())  # the bank's values
        assert all(torch.equal(w16[k], p[idx]) for k, p, idx in views)
        for fmt in ("peft", "vllm", "sglang"):
            f16.save_adapter(n, tmp_path / f"{n}-{fmt}", format=fmt)
            tensors = load_file(str(tmp_path / f"{n}-{fmt}" / "adapter_model.safetensors"))
            assert all(t.dtype == torch.float32 for t in tensors.values()), fmt
            # (the sglang export's zero q/k/v partners are no adapter factor)
            dense = {k: t for k, t in tensors.items() if ".self_attn." in k and t.any()}
            assert dense and all(any(torch.equal(t, m) for m in master.values()) for t in dense.values()), fmt
        f16.save_adapter(n, tmp_path / f"{n}-bf16", dtype=BF16)
        assert all(t.dtype == BF16 for t in load_file(str(tmp_path / f"{n}-bf16" / "adapter_model.safetensors")).values())
    # a master made stale by writing the bank from outside exports the bank
    _, p, idx = f16.adapter_views("b")[0]
    with torch.no_grad():
        p[idx] = 0.5
    assert torch.equal(f16.get_adapter_weights("b").dense[f16.adapter_views("b")[0][0][:-2]][0], p[idx].float())
    with pytest.raises(ValueError, match="dtype"):
        f16.get_adapter_weights("b", dtype=torch.int8)


@pytest.mark.parametrize("export_dtype", [None, BF16])
def test_saved_adapter_continues_training_identically(tmp_path, export_dtype):
    """save_adapter -> load_adapter into a fresh bf16 fleet -> train: bitwise the same as the
    original continuing with fresh moments (reset_optimizer keeps the masters). Exported in
    bf16, the masters' extra bits are lost and the runs differ."""
    f16 = trained_bf16(names="b")
    f16.save_adapter("b", tmp_path / "b", dtype=export_dtype)
    f16.reset_optimizer("b")
    fresh = lf.Fleet(build_debug_model("qwen3_moe", seed=0).to(BF16), max_adapters=4, max_rank=8)
    fresh.add_adapter("z", CONFIGS["c"])  # a neighbour, so "b" lands in another slot
    fresh.load_adapter("b", tmp_path / "b")
    mo, mf = f16.train_state("b").adam.master, fresh.train_state("b").adam.master
    assert all(torch.equal(p[idx], q[jdx]) for (_, p, idx), (_, q, jdx)
               in zip(f16.adapter_views("b"), fresh.adapter_views("b")))  # the same bank either way
    for fl in (f16, fresh):
        fl.set_optimizer("b", OptimConfig(lr=1e-4))
        for s in range(3):
            fl.forward_backward(batch("b", 40 + s))
            fl.optim_step(["b"])
    a, b = weights(f16, "b"), weights(fresh, "b")
    same = all(torch.equal(a[k], b[k]) for k in a)
    if export_dtype is None:
        assert all(torch.equal(mo[k], mf[k]) for k in a) and same
    else:
        assert not same


# ------------------------------------------------------------------ sampling
def test_sample_mixed_batch_in_bf16():
    f16, _ = fleet_pair("qwen3_moe", "abd", pin=False)
    reqs = [lf.SampleRequest(n, [5, 6, 7, 8], num_samples=2) for n in ("a", None, "d", "b")]
    out = f16.sample(reqs, lf.SamplingParams(max_tokens=4, seed=0))
    for seqs in out:
        for s in seqs:
            assert len(s.tokens) == 4 and all(lp <= 0 and lp > -30 for lp in s.logprobs)
    for r, seqs in zip(reqs, out):  # the training forward scores the samples alike (measured 5e-7)
        for s in seqs:
            lp = f16.compute_logprobs(r.adapter, r.prompt_tokens + s.tokens)[len(r.prompt_tokens):]
            assert max(abs(a - b) for a, b in zip(lp, s.logprobs)) < 1e-2
