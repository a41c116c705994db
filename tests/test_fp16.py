"""fp16 training: per-adapter dynamic loss scaling (`LossScaler`).

A Fleet on an fp16 base (or with fp16 factors) scales each adapter's loss before backward, moves
the unscaled gradient into an fp32 accumulator after it, and at `optim_step` skips the step of an
adapter whose gradient holds an inf/nan (lowering its scale) while the other adapters step; the
scale grows after ``growth_interval`` clean steps and is checkpointed with the adapter.
"""

import copy

import pytest
import torch

import lorafleet as lf
from lorafleet.engine import LossScaler, OptimConfig
from lorafleet.models.debug import build_debug_model
from peft_ref import rel
from random_examples import random_examples as batch

torch.set_num_threads(1)
F16 = torch.float16
CONFIGS = {"a": lf.AdapterConfig(rank=4, alpha=8, seed=1),
           "b": lf.AdapterConfig(rank=8, alpha=8, seed=2, target_modules=["q_proj", "v_proj"])}


def fleet_pair(names="ab", factor_dtype=None):
    """An fp16 fleet and the same fleet in fp32 (every weight the fp16 value, upcast)."""
    base = build_debug_model("qwen3", seed=0, dtype=F16)
    f32 = lf.Fleet(copy.deepcopy(base).float(), max_adapters=4, max_rank=8)
    f16 = lf.Fleet(base, max_adapters=4, max_rank=8, dtype=factor_dtype)
    for i, n in enumerate(names):
        f16.add_adapter(n, CONFIGS[n])
        f32.add_adapter(n, CONFIGS[n])
        g = torch.Generator().manual_seed(10 + i)
        w = f16.get_adapter_weights(n, dtype=F16)
        for k, t in w.tensors():
            if k.endswith(".B"):  # non-zero B so gradients reach A too
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        f16.set_adapter_weights(n, w)
        f32.set_adapter_weights(n, w)
    return f16, f32


def grads(fleet, name):
    return torch.cat([g.double().flatten() for g in fleet.adapter_grads(name)])


def weights(fleet, name):
    return {k: t.clone() for k, t in fleet.get_adapter_weights(name).tensors()}


def test_fp16_fleet_has_loss_scalers_others_do_not():
    f16, f32 = fleet_pair("a")
    assert f16.needs_loss_scaling and f16.train_state("a").scaler == LossScaler()
    assert not f32.needs_loss_scaling and f32.train_state("a").scaler is None
    bf = lf.Fleet(build_debug_model("qwen3", seed=0, dtype=torch.bfloat16), max_adapters=1, max_rank=4)
    bf.add_adapter("x", lf.AdapterConfig(rank=4))
    assert bf.train_state("x").scaler is None
    with pytest.raises(ValueError, match="scale"):
        LossScaler(scale=0.0)


@pytest.mark.parametrize("factor_dtype", [None, torch.float32])
def test_loss_scale_keeps_small_gradients_from_underflowing(factor_dtype):
    """Token weights of 1e-7: unscaled, every LoRA gradient underflows fp16 to zero (fp16 factors)
    or is garbage (fp32 factors: the base's fp16 activation gradients underflow); with a loss scale
    of 2^15 they match the fp32 fleet to ~2e-3."""
    f16, f32 = fleet_pair("a", factor_dtype)
    ex = batch("a", 1, weight=1e-7)
    f32.forward_backward(ex)
    ref = grads(f32, "a")
    err = {}
    for scale in (1.0, 2.0**15):
        f16.train_state("a").scaler = LossScaler(scale=scale)
        f16.forward_backward(ex)
        g = grads(f16, "a")
        assert torch.isfinite(g).all()
        err[scale] = rel(g, ref)
        if scale == 1.0 and factor_dtype is None:
            assert not g.any()
        f16.zero_grad("a")
    print(factor_dtype, {k: f"{v:.1e}" for k, v in err.items()})
    assert err[1.0] > 0.5 and err[2.0**15] < 1e-2


def test_overflow_skips_only_that_adapter():
    f16, f32 = fleet_pair("ab")
    f16.train_state("a").scaler = LossScaler(scale=2.0**24)  # unit-weight gradients overflow fp16
    f16.train_state("b").scaler = LossScaler(scale=2.0**8)
    ex = batch("ab", 2, weight=1.0)
    f16.forward_backward(ex)
    f32.forward_backward(ex)
    assert not torch.isfinite(grads(f16, "a")).all()
    assert rel(grads(f16, "b"), grads(f32, "b")) < 1e-2  # a's inf does not reach b's rows
    before = weights(f16, "a"), weights(f16, "b")
    out = f16.optim_step()
    assert out["a"]["skipped"] and not out["b"]["skipped"]
    assert out["a"]["step"] == 0 and out["b"]["step"] == 1
    assert out["a"]["loss_scale"] == 2.0**23 and out["b"]["loss_scale"] == 2.0**8
    after = weights(f16, "a"), weights(f16, "b")
    assert all(torch.equal(before[0][k], after[0][k]) for k in after[0])  # a untouched
    assert any(not torch.equal(before[1][k], after[1][k]) for k in after[1])  # b stepped
    sa = f16.train_state("a")
    assert sa.adam.step == 0 and sa.adam.exp_avg == {} and sa.scaler.skipped_steps == 1
    assert not sa.pending and sa.grad_acc == {}  # the bad gradient is dropped
    # at a finite scale a steps next time
    sa.scaler.scale = 2.0**8
    f16.forward_backward(ex)
    assert not f16.optim_step(["a"])["a"]["skipped"] and sa.adam.step == 1


def test_scale_grows_after_clean_steps_and_backs_off():
    f16, _ = fleet_pair("a")
    f16.train_state("a").scaler = LossScaler(scale=2.0**6, growth_interval=2)
    seen = []
    for s in range(4):
        f16.forward_backward(batch("a", 3 + s))
        seen.append(f16.optim_step()["a"]["loss_scale"])
    assert seen == [2.0**6, 2.0**7, 2.0**7, 2.0**8]
    sc = LossScaler(scale=8.0, growth_interval=2)
    sc.update(True)
    sc.update(False)
    sc.update(True)
    assert (sc.scale, sc.good_steps, sc.skipped_steps) == (4.0, 1, 1)


def test_accumulation_is_unscaled_fp32():
    """Micro-batches accumulate unscaled in fp32 whatever the scale: two calls at different
    scales sum to the same gradient as the fp32 fleet."""
    f16, f32 = fleet_pair("a")
    for s, scale in ((5, 2.0**4), (6, 2.0**10)):
        f16.train_state("a").scaler.scale = scale
        f16.forward_backward(batch("a", s))
        f32.forward_backward(batch("a", s))
    assert all(g.dtype == torch.float32 for g in f16.adapter_grads("a"))
    assert rel(grads(f16, "a"), grads(f32, "a")) < 5e-3


def test_training_tracks_fp32():
    f16, f32 = fleet_pair("ab")
    opt = OptimConfig(lr=2e-2, betas=(0.9, 0.99), grad_clip_norm=1.0)
    for f in (f16, f32):
        for n in "ab":
            f.set_optimizer(n, opt)
    data = batch("ab", 7)
    losses = []
    for _ in range(6):
        r16, r32 = f16.forward_backward(data), f32.forward_backward(data)
        losses.append((sum(r16.losses), sum(r32.losses)))
        out = f16.optim_step()
        f32.optim_step()
        assert not any(o["skipped"] for o in out.values())
    print("loss fp16 / fp32:", [f"{a:.3f}/{b:.3f}" for a, b in losses])
    assert losses[-1][1] < 0.9 * losses[0][1]
    assert all(abs(a - b) <= 0.01 * b for a, b in losses)


def test_checkpoint_keeps_the_scaler(tmp_path):
    f16, _ = fleet_pair("a")
    f16.train_state("a").scaler = LossScaler(scale=2.0**9, growth_interval=3)
    for s in range(2):
        f16.forward_backward(batch("a", 10 + s))
        f16.optim_step()
    f16.train_state("a").scaler.update(False)  # a skipped step, so the state is not the default
    f16.forward_backward(batch("a", 12))  # pending gradients (fp32, unscaled) go in too
    f16.save_state("a", tmp_path / "a")
    other = lf.Fleet(build_debug_model("qwen3", seed=0, dtype=F16), max_adapters=2, max_rank=8)
    other.load_state("a", tmp_path / "a")
    assert other.train_state("a").scaler == f16.train_state("a").scaler
    for fl in (f16, other):
        fl.optim_step()
        fl.forward_backward(batch("a", 13))
        fl.optim_step()
    a, b = weights(f16, "a"), weights(other, "a")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.train_state("a").scaler == f16.train_state("a").scaler
    # an fp32 fleet ignores the scale
    f32 = lf.Fleet(build_debug_model("qwen3", seed=0), max_adapters=1, max_rank=8)
    f32.load_state("a", tmp_path / "a")
    assert f32.train_state("a").scaler is None


def test_sample_in_fp16():
    f16, _ = fleet_pair("ab")
    out = f16.sample([lf.SampleRequest("a", [5, 6, 7], num_samples=2), lf.SampleRequest(None, [5, 6])],
                     lf.SamplingParams(max_tokens=4, seed=0))
    assert all(len(s.tokens) == 4 and all(-30 < lp <= 0 for lp in s.logprobs) for seqs in out for s in seqs)
