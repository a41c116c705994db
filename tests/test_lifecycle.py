"""Adapter lifecycle: add / remove / reuse, every bad input -> ValueError naming the problem,
with no slot or weight changed and the fleet still usable."""

import copy

import pytest
import torch
import transformers

import lorafleet as lf
from lorafleet.models.debug import build_debug_model
from peft_ref import randomize, rel


def snapshot(fleet):
    return [p.detach().clone() for p in fleet.lora_parameters()]


def unchanged(fleet, snap):
    return all(torch.equal(a, b) for a, b in zip(snap, fleet.lora_parameters()))


@pytest.fixture
def fleet():
    f = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=3, max_rank=8)
    f.add_adapter("a", lf.AdapterConfig(rank=4, seed=1))
    randomize(f, "a", seed=1)
    return f


def still_usable(f):
    ids = torch.randint(0, f.model.config.vocab_size, (2, 5))
    with torch.no_grad():
        out = f.forward(ids, adapters=["a", None]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,config,message",
    [
        ("a", lf.AdapterConfig(rank=2), "already exists"),
        ("big", lf.AdapterConfig(rank=9), "rank 9 is above"),
        ("bad", lf.AdapterConfig(rank=2, target_modules=["q_proj", "nope_proj"]), "nope_proj"),
        ("", lf.AdapterConfig(rank=2), "non-empty string"),
        (None, lf.AdapterConfig(rank=2), "non-empty string"),
    ],
)
def test_bad_add_changes_nothing(fleet, name, config, message):
    snap = snapshot(fleet)
    with pytest.raises(ValueError, match=message):
        fleet.add_adapter(name, config)
    assert unchanged(fleet, snap) and list(fleet.adapters) == ["a"]
    still_usable(fleet)


def test_bad_configs_rejected_at_construction():
    with pytest.raises(ValueError, match="rank"):
        lf.AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="expert_sharing"):
        lf.AdapterConfig(expert_sharing="shared_b")
    with pytest.raises(ValueError, match="target_modules"):
        lf.AdapterConfig(target_modules="all-attention")


def test_full_pool(fleet):
    fleet.add_adapter("b", lf.AdapterConfig(rank=2))
    fleet.add_adapter("c", lf.AdapterConfig(rank=2))
    snap = snapshot(fleet)
    with pytest.raises(ValueError, match="slot pool is full"):
        fleet.add_adapter("d", lf.AdapterConfig(rank=2))
    assert unchanged(fleet, snap) and len(fleet.adapters) == 3
    still_usable(fleet)


def test_unknown_adapter_everywhere(fleet):
    snap = snapshot(fleet)
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        fleet.forward(ids, adapters=["a", "zz"])
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        fleet.remove_adapter("zz")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        fleet.save_adapter("zz", "/tmp/never")
    assert unchanged(fleet, snap)
    still_usable(fleet)


def test_bad_forward_shapes(fleet):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2"):
        fleet.forward(ids, adapters=["a", None, None])
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        fleet.forward(ids[0], adapters=["a"])
    with pytest.raises(ValueError, match="attention_mask shape"):
        fleet.forward(ids, attention_mask=torch.ones(2, 4), adapters=["a", None])
    still_usable(fleet)


def test_remove_and_reuse_resets_slot(fleet):
    slot_a = fleet.slot_of("a")
    fleet.remove_adapter("a")
    assert "a" not in fleet.adapters
    # the slot is zero after removal
    # (expert LoRA row pools: the slot holds no rows any more, and every row it freed is zero)
    assert all((p if hasattr(m, "slot_part") else p[slot_a]).abs().sum() == 0
               for m in fleet._att.lora_modules() for p in m.parameters(recurse=False))
    cfg = lf.AdapterConfig(rank=3, seed=7, target_modules=["q_proj"], expert_sharing="shared_outer")
    assert fleet.add_adapter("new", cfg) == slot_a
    # a fresh fleet given the same config draws the same A (init depends on seed, not slot/history)
    other = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=3, max_rank=8)
    other.add_adapter("pad0", lf.AdapterConfig(rank=1))
    other.add_adapter("new", cfg)
    ours, ref = fleet.get_adapter_weights("new"), other.get_adapter_weights("new")
    for (k, t), (_, u) in zip(ours.tensors(), ref.tensors()):
        assert torch.equal(t, u), k
        if k.endswith(".B"):
            assert t.abs().sum() == 0, k
    # nothing of the old tenant leaks: untargeted modules of the slot are zero and disabled
    for m in fleet._att.linears.values():
        if m.short_name != "q_proj":
            assert not m.enabled[slot_a] and m.lora_A[slot_a].abs().sum() == 0


def test_set_weights_bad_shape_changes_nothing(fleet):
    w = fleet.get_adapter_weights("a")
    path = next(iter(w.dense))
    a, b = w.dense[path]
    w.dense[path] = (a[:, :-1], b)
    snap = snapshot(fleet)
    with pytest.raises(ValueError, match=path):
        fleet.set_adapter_weights("a", w)
    assert unchanged(fleet, snap)


def test_unsupported_architecture_named():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        lf.Fleet(transformers.GPT2LMHeadModel(cfg))


def test_detach_restores_model():
    model = build_debug_model("mixtral", seed=0)
    base = copy.deepcopy(model)
    names_before = [n for n, _ in model.named_parameters()]
    fleet = lf.Fleet(model, max_adapters=2, max_rank=4)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4))
    randomize(fleet, "a", seed=0)
    fleet.detach()
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, base(input_ids=ids).logits) < 1e-6
    with pytest.raises(ValueError, match="detached"):
        fleet.add_adapter("b", lf.AdapterConfig(rank=2))


def test_base_weights_frozen_and_untouched(fleet):
    lora = {id(p) for p in fleet.lora_parameters()}
    base = {n: p.detach().clone() for n, p in fleet.model.named_parameters() if id(p) not in lora}
    assert base and len(base) + len(lora) == len(list(fleet.model.parameters()))
    ids = torch.randint(0, 64, (2, 5))
    fleet.model.train()
    fleet.forward(ids, adapters=["a", None]).logits.sum().backward()
    for n, p in fleet.model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
    assert all(p.requires_grad for p in fleet.lora_parameters())
