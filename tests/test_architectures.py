"""Structural attachment on every architecture lorafleet was tried on (issue 13, item 4).

Each family in `lorafleet.models.tiny.TINY_ARCHS` is built from a tiny config in code; a Fleet
attaches by structure (no allow-list); adapter ``a`` (every dense target, plus expert LoRA where
the experts attach) runs in a mixed batch under activation checkpointing, and its logits and every
LoRA gradient must equal PEFT built independently with ``LoraConfig(target_modules=...,
target_parameters=[...experts.gate_up_proj, ...experts.down_proj])`` (`bench/arch_parity.py`
holds the comparison; it prints docs/architectures.md's table). The nine debug architectures are
covered the same way by test_fleet_vs_peft.py.
"""

from __future__ import annotations

import copy
import math
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import transformers

import lorafleet as lf
from lorafleet.lora import MultiLoRAExperts, MultiLoRALinear
from lorafleet.models import arch_spec, discover
from lorafleet.models.debug import build_debug_model
from lorafleet.models.tiny import TINY_ARCHS, UnavailableArchitecture, build_tiny_model

TOL = 2e-5
BENCH = Path(__file__).resolve().parent.parent / "bench" / "arch_parity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("_arch_parity", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


parity = _bench()


def tiny(model_type):
    try:
        return build_tiny_model(model_type)
    except UnavailableArchitecture as e:
        pytest.skip(str(e))


# what each family must attach (expert LoRA or not) and exclude; checked structurally, not from a table
MOE_WITH_EXPERTS = {"granitemoe", "granitemoeshared", "jamba", "minimax", "minimax_m2", "phimoe", "lfm2_moe",
                    "flex_olmo", "qwen3_5_moe_text", "qwen3_next", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe",
                    "dots1", "deepseek_v2"}
EXPERTS_REFUSED = {"llama4_text", "dbrx"}
# routers / gates that are nn.Linear in some transformers version (5.24: the first six; 5.17 also
# has Jamba's feed_forward.router as a plain linear); wherever one is an nn.Linear it is excluded,
# and nothing else is
ROUTERS = {
    "phimoe": ["mlp.router"],
    "hunyuan_v1_moe": ["mlp.gate.wg"],
    "qwen3_5_moe_text": ["mlp.shared_expert_gate"],
    "qwen3_next": ["mlp.shared_expert_gate"],
    "llama4_text": ["feed_forward.router"],
    "dbrx": ["ffn.router.layer"],
    "jamba": ["feed_forward.router"],
}
ROUTER_NAMES = {n for names in ROUTERS.values() for n in names} | {"mlp.gate", "block_sparse_moe.router",
                                                                   "feed_forward.gate", "mlp.gate.layer"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attaches_and_equals_peft(arch):
    try:
        row = parity.run_arch(arch, checkpointing=True)
    except UnavailableArchitecture as e:
        pytest.skip(str(e))
    assert row["checkpointing"], f"{arch}: activation checkpointing was not on"
    assert row["logits_err"] < TOL and row["grad_err"] < TOL, row
    assert row["base_row_err"] < TOL, row
    assert row["effect"] > 1e-3, f"{arch}: the adapter changed nothing"
    assert not row["no_grad"], f"{arch}: targeted but unused (read through .weight?): {row['no_grad']}"
    assert bool(row["experts"]) == (arch in MOE_WITH_EXPERTS), row["experts"]
    assert bool(row["experts_refused"]) == (arch in EXPERTS_REFUSED), row["experts_refused"]
    expected = [n for n in ROUTERS.get(arch, []) if n in row["all_linears"]]
    assert set(expected) <= set(row["routers"]) <= ROUTER_NAMES, (expected, row["routers"])
    assert not set(row["routers"]) & set(row["dense"])


def test_routers_by_structure_not_by_size_coincidence():
    # Qwen3.5's in_proj_a / in_proj_b map hidden -> 4 = the expert count, but live in linear_attn,
    # not in the MoE block: they stay targets; shared_expert_gate [1, H] in the MoE block does not
    model = tiny("qwen3_5_moe_text")
    lin = model.model.layers[0].linear_attn.in_proj_a
    assert lin.out_features == model.model.layers[0].mlp.experts.gate_up_proj.shape[0]
    st = discover(model)
    assert "model.layers.0.linear_attn.in_proj_a" in st.linears
    assert "model.layers.0.mlp.shared_expert_gate" in st.routers
    # the shared expert's MLP (three linears) is never a router, whatever its sizes
    assert {"gate_proj", "up_proj", "down_proj"} <= set(st.linear_names)


@pytest.mark.parametrize("arch,module", [("llama4_text", "model.layers.0.feed_forward.experts"),
                                         ("dbrx", "transformer.blocks.0.ffn.experts")])
def test_unsupported_experts_refused_with_module_and_what_is_missing(arch, module):
    model = tiny(arch)
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as e:
        lf.Fleet(model, max_adapters=2, max_rank=4, expert_lora=True)  # True: expert LoRA required
    msg = str(e.value)
    assert module in msg and "expert_lora=False" in msg and "has_gate" in msg, msg
    # refused before anything changed
    assert not any(isinstance(m, (MultiLoRALinear, MultiLoRAExperts)) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fleet = lf.Fleet(model, max_adapters=2, max_rank=4, expert_lora=False)  # dense LoRA only
    assert fleet.linear_names and not fleet._att.experts


@pytest.mark.parametrize("arch", ["llama4_text", "dbrx"])
def test_default_fleet_on_unsupported_experts_trains_dense_lora(arch):
    """The default expert_lora (None) means "where the experts are supported": Llama 4 / DBRX
    build a dense-only fleet (what the service and jobs do) and an adapter without experts trains;
    one asking for expert LoRA is refused, saying why."""
    fleet = lf.Fleet(tiny(arch), max_adapters=2, max_rank=4)
    assert fleet.expert_lora is False and fleet.linear_names and not fleet._att.experts
    with pytest.raises(ValueError, match="does not support the experts"):
        fleet.add_adapter("e", lf.AdapterConfig(rank=4))
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, experts=False, seed=1))
    before = {k: t.clone() for k, t in fleet.get_adapter_weights("a").tensors()}
    toks = list(range(3, 10))
    out = fleet.forward_backward([lf.Example("a", toks[:-1], toks[1:])])
    assert math.isfinite(out.losses[0])
    assert fleet.optim_step(["a"])
    after = dict(fleet.get_adapter_weights("a").tensors())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_layouts_outside_model_layers():
    assert arch_spec(tiny("gpt_neox")).layers_path == "gpt_neox.layers"
    assert arch_spec(tiny("dbrx")).layers_path == "transformer.blocks"


def test_jamba_dt_proj_is_not_a_target():
    fleet = lf.Fleet(tiny("jamba"), max_adapters=2, max_rank=4)
    assert "dt_proj" not in fleet.linear_names and "x_proj" in fleet.linear_names
    assert any(p.endswith("mamba.dt_proj") for p in fleet._att.excluded)


def test_unseen_model_type_attaches_and_is_reported_once(caplog):
    model = build_debug_model("qwen3_moe", seed=0)
    model.config.model_type = "brand_new_moe"  # no table anywhere knows this name
    with caplog.at_level(logging.INFO, logger="lorafleet.models"):
        fleet = lf.Fleet(model, max_adapters=2, max_rank=4)
        lf.Fleet(copy.deepcopy(build_debug_model("qwen3_moe", seed=0)), max_adapters=2, max_rank=4)
        other = build_debug_model("qwen3_moe", seed=0)
        other.config.model_type = "brand_new_moe"
        lf.Fleet(other, max_adapters=2, max_rank=4)
    lines = [r for r in caplog.records if "brand_new_moe" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.experts"):
        assert name in msg, msg
    assert fleet.linear_names == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert fleet.spec.moe and list(fleet._att.experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_conv1d_model_refused_naming_type():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*Conv1D"):
        lf.Fleet(transformers.GPT2LMHeadModel(cfg))


def test_bare_backbone_refused():
    backbone = build_debug_model("llama", seed=0).model
    with pytest.raises(ValueError, match="causal LM"):
        lf.Fleet(backbone)
