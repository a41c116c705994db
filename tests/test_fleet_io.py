"""Adapters in and out of a fleet: PEFT-made adapters import exactly, every export format
reloads exactly, bad files change nothing."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lorafleet as lf
from lorafleet.adapters.formats import AdapterFormatError
from lorafleet.models.debug import build_debug_model
from peft_ref import randomize, rel


def _peft_made_adapter(arch, tmp_path, experts=True, r=4):
    base = build_debug_model(arch, seed=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    kw = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if experts else {}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path / "peft_made")
    return base, model.eval()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "llama"])
def test_peft_adapter_imports_exactly(arch, tmp_path):
    base, peft_model = _peft_made_adapter(arch, tmp_path, experts=arch != "llama")
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=3, max_rank=8)
    fleet.add_adapter("other", lf.AdapterConfig(rank=2))
    fleet.load_adapter("imported", tmp_path / "peft_made")
    cfg = fleet.adapters["imported"]
    assert cfg.rank == 4 and cfg.experts == (arch != "llama")
    ids = torch.randint(0, base.config.vocab_size, (3, 7))
    with torch.no_grad():
        ours = fleet.forward(ids, adapters=["imported", "other", "imported"]).logits[[0, 2]]
        ref = peft_model(input_ids=ids[[0, 2]]).logits
    assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["peft", "vllm", "sglang"])
@pytest.mark.parametrize("sharing", ["none", "shared_a", "shared_outer"])
def test_export_reimport_same_logits(fmt, sharing, tmp_path):
    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=3, max_rank=8)
    fleet.add_adapter("x", lf.AdapterConfig(rank=3, alpha=5, expert_sharing=sharing, seed=2))
    randomize(fleet, "x", seed=4)
    fleet.save_adapter("x", tmp_path / "x", format=fmt)
    fleet.load_adapter("y", tmp_path / "x")
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        out = fleet.forward(torch.cat([ids, ids]), adapters=["x", "x", "y", "y"]).logits
    assert rel(out[2:], out[:2]) < 1e-5
    meta = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert meta["peft_version"] and meta["peft_type"] == "LORA" and meta["bias"] == "none"


def test_vllm_export_has_every_expert_projection(tmp_path):
    from safetensors.torch import load_file

    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=2, max_rank=8)
    fleet.add_adapter("x", lf.AdapterConfig(rank=4, expert_sharing="shared_outer"))
    fleet.save_adapter("x", tmp_path / "v", format="vllm")
    sd = load_file(tmp_path / "v" / "adapter_model.safetensors")
    E, H = model.config.num_experts, model.config.hidden_size
    inter = model.config.moe_intermediate_size
    shapes = {"gate_proj": ((4, H), (inter, 4)), "up_proj": ((4, H), (inter, 4)), "down_proj": ((4, inter), (H, 4))}
    for layer in range(model.config.num_hidden_layers):
        for e in range(E):
            for proj, (sa, sb) in shapes.items():
                stem = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                assert tuple(sd[f"{stem}.lora_A.weight"].shape) == sa
                assert tuple(sd[f"{stem}.lora_B.weight"].shape) == sb


def _snapshot(fleet):
    return [p.detach().clone() for p in fleet.lora_parameters()]


def test_bad_adapter_files_change_nothing(tmp_path):
    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=2, max_rank=4)
    fleet.add_adapter("keep", lf.AdapterConfig(rank=2))
    randomize(fleet, "keep", seed=1)
    fleet.save_adapter("keep", tmp_path / "good")
    snap = _snapshot(fleet)

    big = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=1, max_rank=8)
    big.add_adapter("r8", lf.AdapterConfig(rank=8))
    big.save_adapter("r8", tmp_path / "rank8")
    with pytest.raises(ValueError, match="rank 8 is above"):
        fleet.load_adapter("r8", tmp_path / "rank8")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        fleet.load_adapter("c", corrupt)
    with pytest.raises(AdapterFormatError):
        fleet.load_adapter("m", tmp_path / "missing")
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    (dora / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError, match="DoRA|use_dora"):
        fleet.load_adapter("d", dora)
    with pytest.raises(ValueError, match="already exists"):
        fleet.load_adapter("keep", tmp_path / "good")
    # a valid load into a full pool fails before anything is written
    fleet.load_adapter("second", tmp_path / "good")
    snap = _snapshot(fleet)
    with pytest.raises(ValueError, match="slot pool is full"):
        fleet.load_adapter("third", tmp_path / "good")
    assert all(torch.equal(a, b) for a, b in zip(snap, fleet.lora_parameters()))
    assert list(fleet.adapters) == ["keep", "second"]


def test_adapter_for_another_model_is_refused(tmp_path):
    dense = lf.Fleet(build_debug_model("qwen3", seed=0), max_adapters=1, max_rank=4)
    dense.add_adapter("d", lf.AdapterConfig(rank=4))
    dense.save_adapter("d", tmp_path / "d")
    moe = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=1, max_rank=4)
    with pytest.raises(ValueError, match="unknown target module"):
        moe.load_adapter("d", tmp_path / "d")
    assert moe.adapters == {}
