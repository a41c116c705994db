"""Training engine: losses vs plain torch, chunked logprobs, AdamW/schedules vs torch, the
isolation invariant (an adapter trained in a mixed fleet == trained alone == PEFT + torch AdamW),
gradient accumulation, bad inputs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lorafleet as lf
from lorafleet.engine.logprobs import token_logprobs
from lorafleet.models.debug import build_debug_model
from peft_ref import peft_alone, rel

V = 256


def make_fleet(arch="qwen3_moe", n=3, max_rank=8):
    fleet = lf.Fleet(build_debug_model(arch, seed=0), max_adapters=n, max_rank=max_rank)
    return fleet


def rand_examples(adapter, n, seed, length=(5, 9), arrays=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        toks = torch.randint(3, V, (L + 1,), generator=g).tolist()
        w = (torch.rand(L, generator=g) * 2 - 0.5).tolist()  # fractional and negative weights
        kw = {}
        if arrays:
            kw = {"logprobs": (-torch.rand(L, generator=g) * 6).tolist(),
                  "advantages": torch.randn(L, generator=g).tolist()}
        out.append(lf.Example(adapter, toks[:-1], toks[1:], w, **kw))
    return out


def nudge(fleet, name, seed):
    """Non-zero B so gradients reach A too."""
    g = torch.Generator().manual_seed(seed)
    w = fleet.get_adapter_weights(name)
    for k, t in w.tensors():
        if k.endswith(".B"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    fleet.set_adapter_weights(name, w)


# ------------------------------------------------------------------ chunked logprobs
def test_chunked_logprobs_match_full_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 53, (37,))
    g = torch.randn(37, dtype=torch.float64)
    lp, ent = token_logprobs(h, W, t, chunk=5)
    (lp * g).sum().backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    logp = F.log_softmax(h @ W.t(), -1)
    ref = logp.gather(1, t[:, None]).squeeze(1)
    (ref * g).sum().backward()
    assert rel(lp, ref) < 1e-6 and rel(gh, h.grad) < 1e-6 and rel(gW, W.grad) < 1e-6
    assert rel(ent, -(logp.exp() * logp).sum(-1).detach()) < 1e-6
    with pytest.raises(ValueError, match="target token ids"):
        token_logprobs(h, W, torch.tensor([53] * 37))


# ------------------------------------------------------------------ losses vs plain torch
def plain_logprobs(fleet, ex):
    """Reference: full logits through Fleet.forward, log_softmax, gather (one example)."""
    ids = torch.tensor([ex.input_tokens])
    logits = fleet.forward(ids, adapters=[ex.adapter]).logits[0].float()
    return F.log_softmax(logits, -1).gather(1, torch.tensor(ex.target_tokens)[:, None]).squeeze(1)


def plain_loss(loss_fn, lp, ex, cfg):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    if loss_fn == "cross_entropy":
        return -(lp * t(ex.weights)).sum()
    ratio = torch.exp(lp - t(ex.logprobs))
    A = t(ex.advantages)
    if loss_fn == "importance_sampling":
        return -(ratio * A).sum()
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    if loss_fn == "ppo":
        return -torch.minimum(ratio * A, ratio.clamp(lo, hi) * A).sum()
    if loss_fn == "cispo":
        return -(ratio.clamp(lo, hi).detach() * lp * A).sum()
    raise AssertionError(loss_fn)


@pytest.mark.parametrize("loss_fn,cfg", [
    ("cross_entropy", None), ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}), ("cispo", None)])
def test_losses_and_grads_match_plain_torch(loss_fn, cfg):
    fleet = make_fleet()
    for i, n in enumerate("ab"):
        fleet.add_adapter(n, lf.AdapterConfig(rank=4 + 2 * i, seed=i))
        nudge(fleet, n, i)
    exs = rand_examples("a", 2, 1, arrays=True) + rand_examples("b", 1, 2, arrays=True)
    exs = [exs[0], exs[2], exs[1]]  # interleaved adapters
    res = fleet.forward_backward(exs, loss_fn=loss_fn, loss_fn_config=cfg)
    ours = {k: p.grad.clone() for k, p in zip(range(10**6), fleet.lora_parameters()) if p.grad is not None}
    for p in fleet.lora_parameters():
        p.grad = None
    total = 0
    for i, ex in enumerate(exs):
        lp = plain_logprobs(fleet, ex)
        assert rel(torch.tensor(res.logprobs[i]), lp.detach()) < 1e-5
        loss = plain_loss(loss_fn, lp, ex, cfg or {})
        assert abs(res.losses[i] - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
        total = total + loss
    total.backward()
    ref = {k: p.grad for k, p in zip(range(10**6), fleet.lora_parameters()) if p.grad is not None}
    assert ours.keys() == ref.keys() and ours
    for k in ours:
        assert rel(ours[k], ref[k]) < 1e-5
    assert res.metrics["a"]["examples:sum"] == 2 and res.metrics["b"]["examples:sum"] == 1
    assert abs(res.metrics["a"]["loss:sum"] - (res.losses[0] + res.losses[2])) < 1e-4


def test_dpo_reference_is_base_model_in_same_step():
    fleet = make_fleet()
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    nudge(fleet, "a", 0)
    chosen, rejected = rand_examples("a", 2, 3)
    res = fleet.forward_backward([chosen, rejected], loss_fn="dpo", loss_fn_config={"beta": 0.5})
    with torch.no_grad():
        ref_c = plain_logprobs(fleet, lf.Example(None, chosen.input_tokens, chosen.target_tokens))
        ref_r = plain_logprobs(fleet, lf.Example(None, rejected.input_tokens, rejected.target_tokens))
    lp_c, lp_r = plain_logprobs(fleet, chosen), plain_logprobs(fleet, rejected)
    wc, wr = torch.tensor(chosen.weights), torch.tensor(rejected.weights)
    margin = ((lp_c - ref_c) * wc).sum() - ((lp_r - ref_r) * wr).sum()
    expected = -F.logsigmoid(0.5 * margin)
    assert abs(res.losses[0] - expected.item()) < 1e-5 and res.losses[1] == 0.0


def test_forward_only_leaves_no_gradient_and_allows_base_rows():
    fleet = make_fleet()
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    exs = rand_examples("a", 1, 0) + rand_examples(None, 1, 1)
    res = fleet.forward_backward(exs, forward_only=True)
    assert all(p.grad is None for p in fleet.lora_parameters())
    assert fleet.pending_adapters() == [] and len(res.logprobs[1]) == len(exs[1].target_tokens)


# ------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules(schedule):
    cfg = lf.OptimConfig(lr=1.0, schedule=schedule, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(t) for t in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert all(v == 1.0 for v in lrs[4:])
    else:
        assert lrs[4] == 1.0 and abs(lrs[14] - 0.1) < 1e-12 and lrs[15] == lrs[14]
        mid = 0.1 + 0.9 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert abs(lrs[9] - mid) < 1e-12
    with pytest.raises(ValueError, match="total_steps"):
        lf.OptimConfig(schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        lf.OptimConfig(schedule="step")


def train(fleet, name, batches, steps, accum=2):
    """`steps` optimizer steps of `accum` forward_backward calls each; returns weights per step."""
    history = []
    for s in range(steps):
        for a in range(accum):
            fleet.forward_backward(batches[(s * accum + a) % len(batches)])
        fleet.optim_step([name] if name else None)
        history.append({k: t.clone() for k, t in fleet.get_adapter_weights(name or "x").tensors()})
    return history


# eps well above fp32 gradient noise: with eps=1e-8 Adam turns a ~1e-9 reduction-order difference in a
# near-zero gradient into a ±lr update (sign amplification), which says nothing about isolation.
# The gradients themselves are compared at 1e-5 in test_fleet_vs_peft / the loss tests.
OPT = lf.OptimConfig(lr=5e-3, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, grad_clip_norm=0.05,
                     schedule="cosine", warmup_steps=1, total_steps=4)


def test_adapter_trained_in_mixed_fleet_equals_trained_alone():
    cfg_x = lf.AdapterConfig(rank=4, alpha=8, seed=5, expert_sharing="shared_a")
    alone = make_fleet()
    alone.add_adapter("x", cfg_x)
    alone.set_optimizer("x", OPT)
    mixed = make_fleet()
    mixed.add_adapter("y", lf.AdapterConfig(rank=8, seed=6, target_modules=["q_proj"]))
    mixed.add_adapter("x", cfg_x)
    mixed.add_adapter("z", lf.AdapterConfig(rank=2, seed=7, experts=False))
    mixed.set_optimizer("x", OPT)
    mixed.set_optimizer("y", lf.OptimConfig(lr=1e-1))
    mixed.set_optimizer("z", lf.OptimConfig(lr=3e-2, grad_clip_norm=0.5))
    xb = [rand_examples("x", 2, s) for s in range(4)]
    others = [rand_examples("y", 2, 10 + s) + rand_examples("z", 1, 20 + s) for s in range(4)]
    h_alone = train(alone, "x", xb, steps=4)
    mixed_batches = [others[i][:1] + xb[i] + others[i][1:] for i in range(4)]
    h_mixed = train(mixed, None, mixed_batches, steps=4)
    for a, m in zip(h_alone, h_mixed):
        for k in a:
            assert rel(m[k], a[k]) < 1e-5, k
    assert mixed.train_state("x").adam.step == 4 and mixed.train_state("y").adam.step == 4
    assert any((h_alone[-1][k] - h_alone[0][k]).abs().max() > 0 for k in h_alone[0])


def test_training_equals_peft_with_torch_adamw(tmp_path):
    base = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    fleet.add_adapter("x", lf.AdapterConfig(rank=4, alpha=8, seed=5))
    nudge(fleet, "x", 1)
    fleet.set_optimizer("x", OPT)
    ref = peft_alone(base, fleet, "x", tmp_path)  # same init, loaded by PEFT
    params = [p for n, p in ref.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPT.lr, betas=OPT.betas, weight_decay=OPT.weight_decay, eps=OPT.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: OPT.lr_at(t) / OPT.lr)
    batches = [rand_examples("x", 2, s) for s in range(4)]
    for s in range(3):
        for a in range(2):
            batch = batches[(2 * s + a) % 4]
            fleet.forward_backward(batch)
            for ex in batch:
                logits = ref(input_ids=torch.tensor([ex.input_tokens])).logits[0].float()
                lp = F.log_softmax(logits, -1).gather(1, torch.tensor(ex.target_tokens)[:, None]).squeeze(1)
                (-(lp * torch.tensor(ex.weights)).sum()).backward()
        fleet.optim_step()
        torch.nn.utils.clip_grad_norm_(params, OPT.grad_clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    out = tmp_path / "after"
    fleet.save_adapter("x", out)
    ref.eval()
    ids = torch.tensor([batches[0][0].input_tokens])
    with torch.no_grad():
        ours = fleet.forward(ids, adapters=["x"]).logits
        theirs = ref(input_ids=ids).logits
    assert rel(ours, theirs) < 1e-5
    moved = {n: p for n, p in ref.named_parameters() if "lora_A" in n}
    ref_reloaded = peft_alone(base, fleet, "x", tmp_path)
    for n, p in ref_reloaded.named_parameters():
        if n in moved:
            assert rel(p, moved[n]) < 1e-5, n


def test_slot_reuse_resets_optimizer_state():
    fleet = make_fleet()
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    fleet.set_optimizer("a", lf.OptimConfig(lr=0.1))
    fleet.forward_backward(rand_examples("a", 1, 0))
    fleet.optim_step()
    assert fleet.train_state("a").adam.step == 1 and fleet.train_state("a").adam.exp_avg
    fleet.forward_backward(rand_examples("a", 1, 0))  # pending gradient left behind
    slot = fleet.slot_of("a")
    fleet.remove_adapter("a")
    fleet.add_adapter("b", lf.AdapterConfig(rank=4))
    assert fleet.slot_of("b") == slot
    st = fleet.train_state("b")
    assert st.adam.step == 0 and not st.adam.exp_avg and not st.pending
    for m in fleet._att.lora_modules():  # expert LoRA: the slot's rows of each pool
        for pname, p in m.named_parameters(recurse=False):
            g = None if p.grad is None else (m.slot_part(pname, p.grad, slot) if hasattr(m, "slot_part") else p.grad[slot])
            assert g is None or g.abs().sum() == 0, pname


def test_optim_step_only_touches_named_adapters():
    fleet = make_fleet()
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    fleet.add_adapter("b", lf.AdapterConfig(rank=4, seed=1))
    for n in "ab":
        fleet.set_optimizer(n, lf.OptimConfig(lr=0.1))
    fleet.forward_backward(rand_examples("a", 1, 0) + rand_examples("b", 1, 1))
    before_b = {k: t.clone() for k, t in fleet.get_adapter_weights("b").tensors()}
    fleet.optim_step(["a"])
    assert fleet.pending_adapters() == ["b"]
    assert all(torch.equal(t, before_b[k]) for k, t in fleet.get_adapter_weights("b").tensors())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        fleet.optim_step(["b", "nope"])
    assert fleet.pending_adapters() == ["b"]  # nothing stepped


# ------------------------------------------------------------------ bad input
def test_bad_forward_backward_inputs():
    fleet = make_fleet()
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    ex = rand_examples("a", 2, 0)
    with pytest.raises(ValueError, match="unknown loss_fn 'mse'"):
        fleet.forward_backward(ex, loss_fn="mse")
    with pytest.raises(ValueError, match="needs 'logprobs'"):
        fleet.forward_backward(ex, loss_fn="ppo")
    with pytest.raises(ValueError, match="takes no option 'clip'"):
        fleet.forward_backward(rand_examples("a", 1, 0, arrays=True), loss_fn="ppo", loss_fn_config={"clip": 1})
    with pytest.raises(ValueError, match="adapter=None"):
        fleet.forward_backward(rand_examples(None, 1, 0))
    with pytest.raises(ValueError, match="unknown adapter 'q'"):
        fleet.forward_backward(rand_examples("q", 1, 0))
    with pytest.raises(ValueError, match="even number"):
        fleet.forward_backward(ex[:1], loss_fn="dpo")
    with pytest.raises(ValueError, match="target_tokens has"):
        lf.Example("a", [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="target token ids"):
        fleet.forward_backward([lf.Example("a", [5, 6], [7, 9999])])
    assert all(p.grad is None for p in fleet.lora_parameters()) and fleet.pending_adapters() == []


def test_reset_optimizer_and_linear_names():
    fleet = make_fleet()
    assert fleet.linear_names == ["k_proj", "o_proj", "q_proj", "v_proj"]
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    fleet.set_optimizer("a", lf.OptimConfig(lr=0.1))
    fleet.forward_backward(rand_examples("a", 1, 0))
    fleet.optim_step()
    before = {k: t.clone() for k, t in fleet.get_adapter_weights("a").tensors()}
    fleet.reset_optimizer("a")
    st = fleet.train_state("a")
    assert st.adam.step == 0 and not st.adam.exp_avg and st.optim.lr == 0.1
    assert all(torch.equal(t, before[k]) for k, t in fleet.get_adapter_weights("a").tensors())
