"""Expert-LoRA row pools: a shared factor is stored once per slot (the bank's bytes equal the
formula per mode, one process and per EP rank), and hot add / remove / slot reuse with mixed
modes — including pool growth and reuse of freed rows — gives what a fresh fleet (and PEFT)
gives, survives save/load, and under EP=2 (gloo) equals one process."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import lorafleet as lf
from lorafleet.distributed.expert_parallel import apply_expert_parallel
from lorafleet.distributed.shards import view_shard
from lorafleet.lora.experts import FACTORS, SHARED_FACTORS
from lorafleet.models.debug import build_debug_model
from distributed_helpers import ep_full_grads, spawn
from peft_ref import fleet_grads, peft_alone, peft_grads, randomize, rel

MODES = ("none", "shared_a", "shared_outer")


def cfg(mode, rank, seed, targets=("q_proj",), experts=True):
    return lf.AdapterConfig(rank=rank, alpha=2 * rank, target_modules=list(targets), experts=experts,
                            expert_sharing=mode, seed=seed)


def factor_numel(m) -> tuple[int, int, int, int]:
    """One expert's numel of each factor at the bank's max rank (FACTORS order)."""
    R = m.bank.max_rank
    return (R * m.hidden_size, m.up_out * R, R * m.inter, m.hidden_size * R)


def slot_bytes(m, mode: str, stored_once: bool = True) -> int:
    """One slot's rows in one module: a shared factor once (``stored_once``) or per local expert."""
    item = m.gate_up_A.element_size()
    E = m.num_local_experts
    return item * sum(n * (1 if shared and stored_once else E) for n, shared in zip(factor_numel(m), SHARED_FACTORS[mode]))


def test_bank_bytes_per_mode_equal_the_formula():
    for dtype in (torch.float32, torch.bfloat16):
        fleet = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=5, max_rank=8, dtype=dtype)
        m = next(iter(fleet._att.experts.values()))
        assert m.bank_bytes() == 0  # nothing allocated before an adapter needs it
        want = 0
        for i, mode in enumerate(MODES):
            before = m.bank_bytes()
            fleet.add_adapter(mode, cfg(mode, 4, i))
            assert m.bank_bytes() - before == slot_bytes(m, mode), mode
            want += slot_bytes(m, mode)
        fleet.add_adapter("att", cfg("none", 4, 9, experts=False))  # no expert LoRA: no rows
        for m in fleet._att.experts.values():
            assert m.bank_bytes() == want
            # the saving against the old [S, E, R, .] layout, per mode (E = 8, so 1/8 of a factor kept)
            old = slot_bytes(m, "none", stored_once=False)
            assert slot_bytes(m, "none") == old
            for mode in ("shared_a", "shared_outer"):
                assert slot_bytes(m, mode) < old
        # free rows are reused first: remove + re-add the same modes does not grow any pool
        sizes = [getattr(m, n).shape[0] for m in fleet._att.experts.values() for _, n in FACTORS]
        fleet.remove_adapter("shared_a")
        fleet.remove_adapter("none")
        fleet.add_adapter("a2", cfg("shared_a", 2, 5))
        fleet.add_adapter("n2", cfg("none", 3, 6))
        assert [getattr(m, n).shape[0] for m in fleet._att.experts.values() for _, n in FACTORS] == sizes


@torch.no_grad()
def rand_views(fleet, name, seed, std=0.2):
    """Non-zero A and B for an adapter, drawn whole per factor (so an EP rank gets its slice of
    the same values): works on a fleet sliced by `apply_expert_parallel` without a comm."""
    g = torch.Generator().manual_seed(seed)
    for key, p, idx in fleet.adapter_views(name):
        tag, v = view_shard(fleet, name, key, p), p[idx]
        shape = (tag.global_size, *v.shape[1:]) if tag is not None else v.shape
        full = torch.randn(shape, generator=g) * std
        p[idx] = tag.slice(full) if tag is not None else full


def churn(fleet, sizes=None):
    """Adds and removes in mixed modes: a pool grows, freed rows are reused by another mode, a
    slot is reused by another mode, and a pending gradient rides through a reallocation."""
    m = next(iter(fleet._att.experts.values()))
    if sizes is not None:
        sizes += [m.gate_up_B.shape[0]]
    fleet.add_adapter("x0", cfg("none", 8, 11, targets=("q_proj", "o_proj")))
    fleet.add_adapter("keep_a", cfg("shared_a", 4, 12))
    rand_views(fleet, "keep_a", 1)
    fleet.add_adapter("x1", cfg("shared_outer", 6, 13))
    fleet.remove_adapter("x0")  # E rows free in every pool
    fleet.add_adapter("keep_o", cfg("shared_outer", 3, 14))  # reuses x0's slot and part of its rows
    rand_views(fleet, "keep_o", 2)
    fleet.remove_adapter("x1")
    fleet.add_adapter("keep_n", cfg("none", 5, 15, targets=("v_proj",)))  # 8 free gate_up A rows, not in one run: repacked
    rand_views(fleet, "keep_n", 3)
    fleet.add_adapter("keep_n2", cfg("none", 2, 16))  # grows again
    rand_views(fleet, "keep_n2", 4)
    if sizes is not None:
        m = next(iter(fleet._att.experts.values()))
        sizes += [m.gate_up_B.shape[0]]


def batch(model, names):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (len(names), 7), generator=g)
    proj = torch.randn(len(names), 7, model.config.vocab_size, generator=g)
    return ids, proj


def fwd_bwd(fleet, names):
    ids, proj = batch(fleet.model, names)
    logits = fleet.forward(ids, adapters=names).logits
    (logits * proj).sum().backward()
    return logits.detach()


ROWS = ["keep_n", "keep_a", None, "keep_o", "keep_n2", "keep_a", "keep_o"]


def test_hot_add_remove_reuse_equals_fresh_fleet_and_peft(tmp_path):
    for arch in ("qwen3_moe", "gpt_oss"):
        base = build_debug_model(arch, seed=0)
        fleet = lf.Fleet(copy.deepcopy(base), max_adapters=5, max_rank=8)
        m = next(iter(fleet._att.experts.values()))
        pool, sizes = m.gate_up_B, []
        churn(fleet, sizes)
        assert m.gate_up_B is pool and sizes[-1] > sizes[0]  # it grew in place: same Parameter object
        # a pending gradient of one adapter, then growth: it must move with the rows
        fwd_bwd(fleet, ["keep_a"])
        pending = fleet_grads(fleet, "keep_a")
        fleet.remove_adapter("keep_n2")
        fleet.add_adapter("keep_n2", cfg("none", 2, 16))
        randomize(fleet, "keep_n2", seed=4)
        fleet.add_adapter("late", cfg("shared_a", 1, 17))  # the pool is full of rows: grows
        moved = fleet_grads(fleet, "keep_a")
        assert all(torch.equal(pending[k], moved[k]) for k in pending)
        for p in fleet.lora_parameters():
            p.grad = None
        fleet.remove_adapter("late")

        fresh = lf.Fleet(copy.deepcopy(base), max_adapters=4, max_rank=8)
        for name in ("keep_n2", "keep_o", "keep_a", "keep_n"):  # other slots, other rows
            fresh.add_adapter_from_weights(name, fleet.get_adapter_weights(name))
        ours, ref = fwd_bwd(fleet, ROWS), fwd_bwd(fresh, ROWS)
        assert rel(ours, ref) < 1e-6
        for name in fresh.adapters:
            g, h = fleet_grads(fleet, name), fleet_grads(fresh, name)
            assert g.keys() == h.keys()
            for k in g:
                assert rel(g[k], h[k]) < 1e-6 or (h[k].abs().max() == 0 and g[k].abs().max() == 0), (arch, name, k)
        # each churned adapter equals PEFT running it alone
        base.eval()
        ids, proj = batch(fleet.model, ROWS)
        for name in ("keep_n", "keep_a", "keep_o"):
            idx = [i for i, a in enumerate(ROWS) if a == name]
            peft = peft_alone(base, fleet, name, tmp_path / arch)
            out = peft(input_ids=ids[idx]).logits
            assert rel(ours[idx], out.detach()) < 1e-5, (arch, name)
            for p in fleet.lora_parameters():
                p.grad = None
            fwd_bwd(fleet, ROWS)
            (out * proj[idx]).sum().backward()
            ref_g, our_g = peft_grads(peft, fleet, name), fleet_grads(fleet, name)
            for k in our_g:
                assert rel(our_g[k], ref_g[k]) < 1e-5, (arch, name, k)


def test_pool_growth_while_an_earlier_graph_is_alive():
    """The README's order: forward + backward, keep the output, load another adapter (the pools
    grow), train. Autograd's gradient accumulator for a grown pool must not keep the old shape
    (it did when only ``.data`` was replaced: "got [16, ...] but expected [8, ...]")."""
    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=3, max_rank=4)
    fleet.add_adapter("a", cfg("none", 4, 1))
    randomize(fleet, "a", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    out = fleet.forward(ids, adapters=["a", "a"])
    out.logits.sum().backward()
    rows = fleet._att.experts[next(iter(fleet._att.experts))].down_A.shape[0]
    fleet.add_adapter("b", cfg("none", 4, 2))  # grows every pool while `out`'s graph is alive
    m = fleet._att.experts[next(iter(fleet._att.experts))]
    assert m.down_A.shape[0] == 2 * rows and m.down_A.grad.shape == m.down_A.shape
    fleet.zero_grad("a")
    ex = [lf.Example("a", input_tokens=[1, 5, 6], target_tokens=[5, 6, 2]),
          lf.Example("b", input_tokens=[1, 7], target_tokens=[7, 2])]
    res = fleet.forward_backward(ex)
    assert res.metrics["a"]["tokens:sum"] == 3 and fleet.pending_adapters() == ["a", "b"]
    assert out.logits.shape[0] == 2


def test_save_load_round_trip_through_churned_pools(tmp_path):
    fleet = lf.Fleet(build_debug_model("deepseek_v3", seed=0), max_adapters=4, max_rank=8)
    rename = {"q_proj": "q_b_proj", "v_proj": "kv_b_proj", "o_proj": "o_proj"}
    for n, (mode, r) in enumerate(zip(MODES, (6, 3, 4))):
        fleet.add_adapter(f"t{n}", lf.AdapterConfig(rank=r, target_modules=[rename["q_proj"]], experts=True,
                                                     expert_sharing=mode, seed=n))
        randomize(fleet, f"t{n}", seed=20 + n)
    fleet.set_optimizer("t1", lf.OptimConfig(lr=1e-2))
    ex = [lf.Example("t1", list(range(3, 9)), list(range(4, 10)), weights=[1.0] * 6)]
    fleet.forward_backward(ex)
    fleet.optim_step()
    fleet.forward_backward(ex)  # pending gradient in the state
    for n in range(3):
        fleet.save_adapter(f"t{n}", tmp_path / f"peft{n}")
    fleet.save_state("t1", tmp_path / "state1")

    other = lf.Fleet(build_debug_model("deepseek_v3", seed=0), max_adapters=4, max_rank=8)
    other.add_adapter("pad", lf.AdapterConfig(rank=8, expert_sharing="none", seed=9))
    other.add_adapter("pad2", lf.AdapterConfig(rank=8, expert_sharing="shared_outer", seed=9))
    other.remove_adapter("pad")  # the loads land in reused rows and in grown pools
    for n in (2, 0):
        other.load_adapter(f"t{n}", tmp_path / f"peft{n}")
    other.load_state("t1", tmp_path / "state1")
    for n in range(3):
        a, b = dict(fleet.get_adapter_weights(f"t{n}").tensors()), dict(other.get_adapter_weights(f"t{n}").tensors())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
    # the restored optimizer state and pending gradient continue identically
    fleet.optim_step()
    other.optim_step()
    a, b = dict(fleet.get_adapter_weights("t1").tensors()), dict(other.get_adapter_weights("t1").tensors())
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- EP = 2, gloo
EP_ROWS = ["keep_n", None, "keep_a", "keep_o", "keep_n2", "keep_a", "post", "keep_o"]


def ep_build(ep_group=None):
    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=5, max_rank=8)
    churn(fleet)
    if ep_group is not None:
        apply_expert_parallel(fleet, ep_group)
    # churn after the slicing: remove, reuse rows with another mode, grow a narrowed pool
    fleet.remove_adapter("keep_n2")
    fleet.add_adapter("post", cfg("shared_outer", 4, 30))
    rand_views(fleet, "post", 31)
    fleet.add_adapter("keep_n2", cfg("none", 2, 16))
    rand_views(fleet, "keep_n2", 4)
    return fleet


def case_ep2(rank, world):
    ref = ep_build()
    ids, proj = batch(ref.model, EP_ROWS)
    ref_out = ref.forward(ids, adapters=EP_ROWS).logits
    (ref_out * proj).sum().backward()
    ref_grads = ep_full_grads(ref, distributed=False)
    ref_w = {n: dict(ref.get_adapter_weights(n).tensors()) for n in ref.adapters}

    ep = ep_build(dist.group.WORLD)
    for m in ep._att.experts.values():  # per rank: per-expert rows E / 2, shared rows whole
        assert m.num_local_experts == m.num_experts // world
        assert m.bank_bytes() == sum(slot_bytes(m, c.expert_sharing) for c in ep.adapters.values() if c.experts)
    rows = list(range(rank, len(EP_ROWS), world))
    out = ep.forward(ids[rows], adapters=[EP_ROWS[i] for i in rows]).logits
    (out * proj[rows]).sum().backward()
    assert rel(out.detach(), ref_out.detach()[rows]) <= 1e-5
    grads = ep_full_grads(ep)
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        assert rel(grads[k], g) <= 1e-5 or (g.abs().max() == 0 and grads[k].abs().max() == 0), k
    for n, w in ref_w.items():
        got = {}
        for key, p, idx in ep.adapter_views(n):
            tag = view_shard(ep, n, key, p)
            v = p[idx].detach()
            got[key] = tag.gather(v) if tag is not None else v
        assert all(torch.equal(got[k], w[k]) for k in w), n


def _worker(rank, world, case):
    dist.init_process_group("gloo")  # torchrun's environment, set by `spawn`; it leaves the group
    globals()[case](rank, world)


def test_ep2_churned_pools_equal_one_process(tmp_path):
    spawn(_worker, 2, tmp_path, "case_ep2")
