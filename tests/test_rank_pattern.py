"""AdapterConfig(rank_pattern=..., alpha_pattern=...) with PEFT's semantics (issue 13): each module
trains at its own rank and scale, exactly as PEFT; export writes the patterns back; checkpoints keep
them; the one-rank engine layouts refuse an adapter whose scales differ."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

import lorafleet as lf
from lorafleet.config import pattern_value
from lorafleet.models.debug import build_debug_model
from peft_ref import fleet_grads, peft_grads, quiet_peft_warnings, rel  # noqa: F401

TOL = 1e-5
CFG = lf.AdapterConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], seed=1,
                       rank_pattern={"v_proj": 2, r".*\.q_proj": 8}, alpha_pattern={"down_proj": 3, "lm_head": 2})
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.1.mlp.down_proj"


def batch(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        toks = torch.randint(1, 256, (7,), generator=g).tolist()
        out.append(lf.Example(adapter, toks[:-1], toks[1:]))
    return out


def peft_loss(model, examples):
    total = 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_tokens])).logits[0].float()
        total = total - F.log_softmax(logits, -1).gather(1, torch.tensor(ex.target_tokens)[:, None]).sum()
    return total


def trained_fleet():
    base = build_debug_model("qwen3", seed=0)
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=3, max_rank=8)
    fleet.add_adapter("n", lf.AdapterConfig(rank=2, target_modules=["q_proj"], seed=9))  # a neighbour
    fleet.add_adapter("x", CFG)
    for name in ("n", "x"):
        fleet.set_optimizer(name, lf.OptimConfig(lr=1e-2))
    for step in range(2):  # B leaves zero, so A gets gradients too
        fleet.forward_backward(batch("x", step) + batch("n", 10 + step))
        fleet.optim_step()
    return base, fleet


def test_module_ranks_and_scales_in_the_slot():
    _, fleet = trained_fleet()
    slot = fleet.slot_of("x")
    lin = fleet._att.linears
    assert fleet.bank.info(slot).rank == 8 == CFG.slot_rank
    assert lin[V].lora_A[slot, 2:].abs().sum() == 0 and lin[V].lora_B[slot, :, 2:].abs().sum() == 0  # padding
    assert lin[V].lora_A[slot, :2].abs().sum() > 0 and lin[Q].lora_A[slot, 4:8].abs().sum() > 0
    assert lin[V].scale_override[slot] == 8 / 2 and lin[Q].scale_override[slot] == 8 / 8
    assert lin[DOWN].scale_override[slot] == 3 / 4 and lin["lm_head"].scale_override[slot] == 2 / 4
    assert slot not in lin["model.layers.0.self_attn.k_proj"].scale_override
    fleet.remove_adapter("x")
    assert all(slot not in m.scale_override for m in lin.values())


def test_export_writes_patterns_and_peft_gives_same_logits_and_grads(tmp_path):
    base, fleet = trained_fleet()
    fleet.save_adapter("x", tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    want = {Q: (8, 8), V: (2, 8), DOWN: (4, 3), "lm_head": (4, 2)}  # (rank, alpha) per module, as configured
    for key, (r, alpha) in want.items():  # the file's patterns resolve to them (PEFT's lookup)
        assert pattern_value(cfg["rank_pattern"], key, cfg["r"]) == r, key
        assert pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"]) == alpha, key
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x", is_trainable=True)
    ex = batch("x", 5)
    fleet.zero_grad("x")
    res = fleet.forward_backward(ex)
    loss = peft_loss(pm, ex)
    loss.backward()
    assert abs(res.metrics["x"]["loss:sum"] - loss.item()) <= TOL * loss.item()
    ours, theirs = fleet_grads(fleet, "x"), peft_grads(pm, fleet, "x")
    for k in (f"{V}.A", f"{V}.B", f"{Q}.A", f"{DOWN}.B", "lm_head.B"):
        r = fleet.adapters["x"].module_rank(k[:-2])  # PEFT holds the module's own rank: the slot pads it
        a = ours[k][:r] if k.endswith(".A") else ours[k][:, :r]
        assert rel(a, theirs[k]) <= TOL, k
    # and back: the PEFT file loads with those per-module scales, same logits
    other = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    other.load_adapter("y", tmp_path / "x")
    ids = torch.tensor([ex[0].input_tokens])
    with torch.no_grad():
        assert rel(other.forward(ids, adapters=["y"]).logits, pm(input_ids=ids).logits) <= TOL


def test_checkpoint_keeps_patterns_and_engine_layouts_refuse_mixed_scales(tmp_path):
    base, fleet = trained_fleet()
    fleet.save_state("x", tmp_path / "st")
    other = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    other.load_state("x", tmp_path / "st")
    assert other.adapters["x"] == CFG
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(other.forward(ids, adapters=["x"]).logits, fleet.forward(ids, adapters=["x"]).logits)
    # vLLM's layout has one alpha: the other module scales are folded into B (serving is exact)
    fleet.save_adapter("x", tmp_path / "v", format="vllm")
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (8, 16, {}, {})
    served = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    served.load_adapter("v", tmp_path / "v")
    with torch.no_grad():
        assert rel(served.forward(ids, adapters=["v"]).logits, fleet.forward(ids, adapters=["x"]).logits) <= TOL
    assert fleet.get_adapter_weights("x").config == CFG  # the fleet's adapter is untouched
    with pytest.raises(ValueError, match="rank_pattern rank 16 is above this fleet's max_rank 8"):
        other.add_adapter("big", CFG.with_(rank_pattern={"q_proj": 16}))
    with pytest.raises(ValueError, match="rank_pattern.*positive integer"):
        lf.AdapterConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="alpha_pattern.*regular expression"):
        lf.AdapterConfig(alpha_pattern={"(": 1})


def test_expert_rank_pattern_pads_the_rows_and_scales_the_projection():
    fleet = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=2, max_rank=8)
    cfg = lf.AdapterConfig(rank=4, alpha=8, target_modules=["q_proj"], rank_pattern={"gate_up_proj": 8},
                           alpha_pattern={"gate_up_proj": 4})
    fleet.add_adapter("x", cfg)
    slot, path = fleet.slot_of("x"), "model.layers.0.mlp.experts"
    m = fleet._att.experts[path]
    views = {k: p[idx] for k, p, idx in m.factor_views(slot, 8, "none")}
    assert views["gate_up.A"].abs().sum() > 0 and views["down.A"][:, 4:].abs().sum() == 0
    assert views["down.A"][:, :4].abs().sum() > 0
    assert m.scale_override == {(slot, "gate_up"): 0.5}  # down keeps the adapter's 8 / 4
