"""PEFT parity of adapter import / export (issue 13, items 1, 3 and 5), built with real PEFT 0.21.

Each case makes an adapter with PEFT on a debug model (`get_peft_model` -> random factors ->
`save_pretrained`), loads it into a fleet, and checks the fleet's logits (and, where training
must continue identically, its LoRA gradients) against PEFT's at fp32, then exports it and loads
the export back with `PeftModel.from_pretrained`. What lorafleet cannot reproduce is refused with
a ValueError that says why and what to do instead.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lorafleet as lf
from lorafleet.adapters.formats import load_adapter_dir
from lorafleet.models.debug import build_debug_model
from peft_ref import fleet_grads, quiet_peft_warnings, rel  # noqa: F401 (autouse fixture)

TOL = 1e-5
B, T = 2, 9


_BASES: dict[str, torch.nn.Module] = {}


def base_model(arch: str) -> torch.nn.Module:
    if arch not in _BASES:
        _BASES[arch] = build_debug_model(arch, seed=0)
    return copy.deepcopy(_BASES[arch])


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randn(B, T, 256, generator=g)


def randomize_lora(pm, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_adapter(arch, tmp_path, lc: LoraConfig, name="peft", seed=0):
    """(untouched base, PEFT model with random factors in eval mode, its saved directory)."""
    base = base_model(arch)
    pm = get_peft_model(copy.deepcopy(base), lc)
    randomize_lora(pm, seed)
    pm.eval()
    out = tmp_path / name
    pm.save_pretrained(out)
    return base, pm, out


def peft_logits_and_grads(pm, ids, proj):
    """PEFT's logits and LoRA gradients (keys as in its adapter file)."""
    pm.zero_grad()
    logits = pm(input_ids=ids).logits
    (logits * proj).sum().backward()
    grads = {n.replace(".default.", "."): p.grad.detach().clone()
             for n, p in pm.named_parameters() if "lora_" in n and p.grad is not None}
    return logits.detach(), grads


def as_weights(adapter_dir: Path, tensors: dict, fleet: lf.Fleet, tmp_path: Path):
    """Read PEFT tensors (e.g. gradients) that are laid out like `adapter_dir`'s through the same
    loader, so they come back in the fleet's (padded) layout."""
    d = tmp_path / f"as_{adapter_dir.name}"
    d.mkdir()
    (d / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
    save_file({k: tensors[k].contiguous() for k in keys}, str(d / "adapter_model.safetensors"))
    linear_shapes = {p: (m.in_features, m.out_features) for p, m in fleet._att.linears.items()}
    return load_adapter_dir(d, experts_arch=fleet.experts_arch(), model_type=fleet.spec.model_type,
                            linear_shapes=linear_shapes)


def fleet_run(base, adapter_dir, ids, proj, checkpointing=False, max_rank=16):
    model = copy.deepcopy(base)
    fleet = lf.Fleet(model, max_adapters=3, max_rank=max_rank)
    fleet.add_adapter("other", lf.AdapterConfig(rank=2, seed=5))  # a neighbour in the pool
    fleet.load_adapter("x", adapter_dir)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    logits = fleet.forward(ids, adapters=["x"] * B).logits
    (logits * proj).sum().backward()
    model.eval()
    return fleet, logits.detach()


def check_export(fleet, base, ref_logits, ids, tmp_path, same_config_as=None, same_shapes_as=None):
    """Export, load with PEFT, compare logits. ``same_config_as``: a PEFT directory whose r,
    lora_alpha, rank_pattern and alpha_pattern the export must reproduce; ``same_shapes_as``
    (implied by it): one whose tensor names and shapes it must reproduce (zero padding cut again)."""
    with torch.no_grad():
        assert rel(base(input_ids=ids).logits, ref_logits) > 1e-3  # the adapter does something
    out = tmp_path / "export"
    fleet.save_adapter("x", out, format="peft")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        err = rel(pm(input_ids=ids).logits, ref_logits)
    assert err <= TOL, err
    if same_config_as is not None:
        fields = ("r", "lora_alpha", "rank_pattern", "alpha_pattern")
        want = json.loads((Path(same_config_as) / "adapter_config.json").read_text())
        got = json.loads((out / "adapter_config.json").read_text())
        assert {f: got[f] for f in fields} == {f: want[f] for f in fields}
    if same_shapes_as or same_config_as:
        def shapes(d):
            return {k: tuple(t.shape) for k, t in load_file(str(Path(d) / "adapter_model.safetensors")).items()}
        assert shapes(out) == shapes(same_shapes_as or same_config_as)
    return err


def check_grads(fleet, adapter_dir, peft_grads, tmp_path):
    want = dict(as_weights(adapter_dir, peft_grads, fleet, tmp_path).tensors())
    got = fleet_grads(fleet, "x")
    assert want.keys() == got.keys()
    for k in want:
        scale = max(want[k].abs().max().item(), 1e-12)
        err = (got[k] - want[k]).abs().max().item() / scale
        assert err <= TOL, (k, err)


# ----------------------------------------------------------------------------- 1. base-modifying inits
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_modifying_init_is_refused(init, tmp_path):
    """PiSSA / OLoRA saved without conversion assume W_res = W - s·B0·A0: refused, not silently wrong."""
    base, pm, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=init))
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        fleet.load_adapter("x", d)
    assert fleet.adapters == {}


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "lora_ga", "loftq", "PiSSA"])
def test_base_modifying_init_field_is_refused(init, tmp_path):
    _, _, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="init_lora_weights.*path_initial_model_for_weight_conversion"):
        load_adapter_dir(d)


def test_converted_pissa_loads_exactly(tmp_path):
    """Saved with path_initial_model_for_weight_conversion, a PiSSA adapter is a plain LoRA of rank
    2r (init_lora_weights true) for the original base: it loads, matches PEFT's PiSSA model on
    its residual base, and exports."""
    base = base_model("llama")
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # "training": move every factor away from its PiSSA init
        g = torch.Generator().manual_seed(3)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    ids, proj = inputs()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits  # PEFT: PiSSA factors on the residual base
        assert rel(base(input_ids=ids).logits, ref) > 1e-2
    fleet, logits = fleet_run(base, tmp_path / "conv", ids, proj)
    assert fleet.adapters["x"].rank == 8
    assert rel(logits, ref) <= TOL
    check_export(fleet, base, ref, ids, tmp_path)


# ----------------------------------------------------------------------------- 3. the standard MoE recipe
MOE_RECIPE = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "deepseek_v3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("arch", list(MOE_RECIPE))
def test_moe_recipe_loads_exactly(arch, checkpointing, tmp_path):
    """PEFT turns gate/up/down into target_parameters with rank_pattern {gate_up_proj: 2r} and
    alpha_pattern {2 alpha}: alpha/r is equal everywhere, so rank 2r with zero padding is exact,
    for the outputs and (the padding's gradients are zero) for continued training."""
    base, pm, d = peft_adapter(arch, tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=MOE_RECIPE[arch]))
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 8} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 16}
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # equal scales: nothing to warn about
        fleet, logits = fleet_run(base, d, ids, proj, checkpointing)
    c = fleet.adapters["x"]
    assert (c.rank, c.alpha, c.experts) == (8, 16.0, True)
    err = rel(logits, ref)
    assert err <= TOL, err
    check_grads(fleet, d, grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path, same_config_as=d)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_all_linear_router_lora_is_refused(arch, tmp_path):
    """PEFT "all-linear" on MoE models also puts LoRA on the router `gate.weight`, which changes
    routing; lorafleet keeps routers frozen, so the adapter is refused, naming the router."""
    _, _, d = peft_adapter(arch, tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fleet = lf.Fleet(base_model(arch), max_adapters=2, max_rank=16)
    with pytest.raises(ValueError, match=r"'gate\.weight' puts LoRA on the MoE router \(model\.layers\.\d\.mlp\.gate"):
        fleet.load_adapter("x", d)


def test_dense_router_linear_is_refused(tmp_path):
    """Qwen2-MoE's shared_expert_gate is an nn.Linear with one output: a gate, never a target."""
    _, _, d = peft_adapter("qwen2_moe", tmp_path, LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "shared_expert_gate"]))
    fleet = lf.Fleet(base_model("qwen2_moe"), max_adapters=2, max_rank=16)
    with pytest.raises(ValueError, match="router / gate linear 'model.layers.0.mlp.shared_expert_gate'"):
        fleet.load_adapter("x", d)


# ----------------------------------------------------------------------------- 5. rank / alpha patterns
def test_rank_and_alpha_pattern_equal_scale_is_exact(tmp_path):
    """Per-module ranks with alpha/r equal everywhere: zero padding, exact outputs and gradients."""
    lc = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                    rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
                    alpha_pattern={"q_proj": 16, r"layers\.1\.mlp\.down_proj": 4})
    base, pm, d = peft_adapter("llama", tmp_path, lc)
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fleet, logits = fleet_run(base, d, ids, proj, checkpointing=True)
    assert (fleet.adapters["x"].rank, fleet.adapters["x"].alpha) == (8, 16.0)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path, same_shapes_as=d)


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_pattern_other_scale_is_exact_in_training(rslora, tmp_path):
    """rank_pattern alone gives those modules another alpha/r: each keeps its own scale (a
    per-(slot, module) override), so logits AND gradients equal PEFT's, with no warning. Before,
    the ratio was folded into B: exact outputs, gradients off by that ratio."""
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    base, pm, d = peft_adapter("qwen3", tmp_path, lc)
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fleet, logits = fleet_run(base, d, ids, proj)
    assert fleet.adapters["x"].rank == 4 and fleet.adapters["x"].alpha_pattern
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path)


def test_eva_adapter_loads_exactly(tmp_path):
    """EVA leaves the base untouched (B = 0, A from activations) and redistributes ranks through
    rank_pattern / alpha_pattern with alpha/r kept: a plain LoRA with per-module ranks."""
    from peft import EvaConfig, initialize_lora_eva_weights

    base = base_model("llama")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 256, (4, 16), generator=g)} for _ in range(6)]
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                    init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    pm = get_peft_model(copy.deepcopy(base), lc, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(pm, dataloader=data, show_progress_bar=False)
    with torch.no_grad():  # B = 0 after EVA: give it some "training"
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "eva")
    cfg = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "eva" and cfg["rank_pattern"]
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    fleet, logits = fleet_run(base, tmp_path / "eva", ids, proj)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, tmp_path / "eva", grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path, same_shapes_as=tmp_path / "eva")


# ----------------------------------------------------------------------------- 5. layer-restricted targets
@pytest.mark.parametrize("how", ["layers_to_transform", "regex"])
def test_layer_restricted_targets_load_exactly(how, tmp_path):
    """Modules the file leaves out get zero LoRA (A = B = 0, zero gradients, stays zero)."""
    if how == "layers_to_transform":  # PEFT: dense targets in layer 1 only, down_proj -> both experts modules
        arch = "deepseek_v3"
        lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "kv_b_proj", "down_proj"],
                        layers_to_transform=[1], layers_pattern="layers")
    else:  # (PEFT 0.21 widens a regex to every layer on the MoE models it converts for transformers v5)
        arch = "qwen3"
        lc = LoraConfig(r=4, lora_alpha=8,
                        target_modules=r".*\.(0\.self_attn\.q_proj|1\.(self_attn\.v|mlp\.down)_proj)")
    base, pm, d = peft_adapter(arch, tmp_path, lc)
    keys = load_file(str(d / "adapter_model.safetensors"))
    assert not any(".0.self_attn.v_proj" in k or ".0.self_attn.o_proj" in k for k in keys)  # restricted
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    fleet, logits = fleet_run(base, d, ids, proj, checkpointing=True)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)
    w = fleet.get_adapter_weights("x")
    padded = [p for p in w.dense if f"base_model.model.{p}.lora_A.weight" not in keys]
    assert padded and all(not w.dense[p][0].any() and not w.dense[p][1].any() for p in padded)
    check_export(fleet, base, ref, ids, tmp_path)


def test_one_layer_one_expert_projection_loads_exactly(tmp_path):
    """target_parameters restricted to one layer's gate_up_proj: the other experts module and every
    down_proj get zero LoRA."""
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                    target_parameters=["model.layers.1.mlp.experts.gate_up_proj"])
    base, pm, d = peft_adapter("qwen3_moe", tmp_path, lc)
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    fleet, logits = fleet_run(base, d, ids, proj)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path)


# ----------------------------------------------------------------------------- 5. dropout, variants
def test_lora_dropout_is_loaded_and_outputs_are_exact(tmp_path):
    base, pm, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.1))
    ids, proj = inputs()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits  # eval mode: PEFT's dropout is off
    fleet, logits = fleet_run(base, d, ids, proj)  # eval mode: no dropout either
    assert fleet.adapters["x"].lora_dropout == 0.1
    assert rel(logits, ref) <= TOL


def test_mica_warns_b_is_frozen_in_peft(tmp_path):
    base, pm, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                             init_lora_weights="mica"))
    ids, proj = inputs()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    with pytest.warns(UserWarning, match="MiCA's lora_B frozen"):
        _, logits = fleet_run(base, d, ids, proj)
    assert rel(logits, ref) <= TOL


@pytest.mark.parametrize("field,value", [
    ("alora_invocation_tokens", [1, 2]), ("use_qalora", True), ("layer_replication", [[0, 2]]),
    ("trainable_token_indices", [3]), ("use_bdlora", {"nblocks": 2}), ("init_lora_weights", "made_up"),
])
def test_lora_variants_are_refused(field, value, tmp_path):
    _, _, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        load_adapter_dir(d)


def test_lm_head_lora_loads_with_peft_logits(tmp_path):
    """Refused before issue 13's attachment; now the head is a LoRA target (tests/test_embedding_attach.py)."""
    _, pm, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    fleet = lf.Fleet(base_model("llama"), max_adapters=2, max_rank=8)
    fleet.load_adapter("x", d)
    ids, _ = inputs()
    with torch.no_grad():
        assert rel(fleet.forward(ids, adapters=["x"] * B).logits, pm(input_ids=ids).logits) <= TOL


def test_export_cuts_zero_rank_tails_per_module(tmp_path):
    """Export writes each module at the rank it uses: a module name whose modules share one rank
    gets one `.*\\.<name>` entry, a name shared with other ranks (dense shared_expert.down_proj next
    to the experts' down_proj) per-module entries; PEFT reproduces the fleet."""
    base = base_model("qwen2_moe")
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    fleet.add_adapter("x", lf.AdapterConfig(rank=4, alpha=8, target_modules=["o_proj", "down_proj"], experts=True))
    g = torch.Generator().manual_seed(0)
    w = fleet.get_adapter_weights("x")
    for key, t in w.tensors():
        t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    cut = "model.layers.0.mlp.shared_expert.down_proj"
    w.dense[cut][0][2:] = 0
    w.dense[cut][1][:, 2:] = 0
    for p, (a, b) in w.dense.items():
        if p.endswith("o_proj"):
            a[3:] = 0
            b[:, 3:] = 0
    fleet.set_adapter_weights("x", w)
    ids, _ = inputs()
    with torch.no_grad():
        ref = fleet.forward(ids, adapters=["x"] * B).logits
    check_export(fleet, base, ref, ids, tmp_path)
    cfg = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {r".*\.o_proj": 3, r"model\.layers\.0\.mlp\.shared_expert\.down_proj": 2}
    assert cfg["alpha_pattern"] == {r".*\.o_proj": 6, r"model\.layers\.0\.mlp\.shared_expert\.down_proj": 4}
    back = load_adapter_dir(tmp_path / "export", experts_arch=fleet.experts_arch(), model_type="qwen2_moe")
    assert back.config.rank == 4 and back.config.scale == 2.0
    for key, t in back.tensors():
        assert torch.equal(t, dict(w.tensors())[key]), key


def test_moe_recipe_with_rslora_keeps_gate_up_scale(tmp_path):
    """Under rsLoRA PEFT's fused gate_up (rank 2r, alpha 2 alpha) has scale sqrt(2) times the
    others': kept as the experts' gate_up scale of the slot, so gradients equal PEFT's too."""
    base, pm, d = peft_adapter("qwen3_moe", tmp_path, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                 target_modules=MOE_RECIPE["qwen3_moe"]))
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    fleet, logits = fleet_run(base, d, ids, proj)
    experts = fleet._att.experts["model.layers.0.mlp.experts"]
    assert experts.scale_override[(fleet.slot_of("x"), "gate_up")] == pytest.approx(8 * 2 / 8 ** 0.5)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)
    check_export(fleet, base, ref, ids, tmp_path)


# ----------------------------------------------------------------------------- scales folding could not hold
def test_zero_lora_alpha_with_a_nonzero_alpha_pattern_loads_exactly(tmp_path):
    """lora_alpha 0 with an alpha_pattern entry: no ratio could be folded into B (it was refused);
    with per-module scales it is an ordinary adapter whose other modules do nothing."""
    base, _, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=0, alpha_pattern={"v_proj": 8},
                                                            target_modules=["q_proj", "v_proj", "o_proj"]))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True)
    ids, proj = inputs()
    ref, grads = peft_logits_and_grads(pm, ids, proj)
    fleet, logits = fleet_run(base, d, ids, proj)
    assert rel(logits, ref) <= TOL
    check_grads(fleet, d, grads, tmp_path)


def test_alpha_pattern_overflowing_float32_is_a_format_error(tmp_path):
    """An alpha_pattern so large its scale is inf in float32: an AdapterFormatError naming it."""
    from lorafleet.adapters.formats import AdapterFormatError

    _, _, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"v_proj": 1e300}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    fleet = lf.Fleet(base_model("llama"), max_adapters=2, max_rank=8)
    with pytest.raises(AdapterFormatError, match="v_proj.*float32"):
        fleet.load_adapter("x", d)
    assert fleet.adapters == {}


def test_non_finite_adapter_tensor_is_refused(tmp_path):
    _, _, d = peft_adapter("llama", tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    f = d / "adapter_model.safetensors"
    ts = load_file(str(f))
    key = sorted(k for k in ts if "lora_B" in k)[0]
    ts[key][0, 0] = float("nan")
    save_file(ts, str(f))
    fleet = lf.Fleet(base_model("llama"), max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.B has non-finite values"):
        fleet.load_adapter("x", d)
    assert fleet.adapters == {}
