"""Helpers that run one adapter alone in PEFT, the reference every fleet result is checked against."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel

import lorafleet as lf
from lorafleet.lora.experts import SHARED_FACTORS


@pytest.fixture(autouse=True)
def quiet_peft_warnings():
    """PEFT's notes about target_modules / fused experts, expected in every PEFT comparison: an
    autouse fixture for the modules that import it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        warnings.filterwarnings("ignore", message=".*(target_modules|target_parameters|fused|PEFT).*")
        yield


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def randomize(fleet: lf.Fleet, name: str, seed: int, std: float = 0.2) -> None:
    """Give an adapter non-zero A and B (a fresh B is zero, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    w = fleet.get_adapter_weights(name)
    for _, t in w.tensors():
        t.copy_(torch.randn(t.shape, generator=g) * std)
    fleet.set_adapter_weights(name, w)


def peft_alone(base_model, fleet: lf.Fleet, name: str, tmp_path):
    """Export `name` in PEFT format and load it into a copy of the untouched base with PEFT."""
    out = tmp_path / f"peft_{name}"
    fleet.save_adapter(name, out, format="peft")
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), out, is_trainable=True)
    return model


def peft_grads(peft_model, fleet: lf.Fleet, name: str) -> dict[str, torch.Tensor]:
    """PEFT's LoRA gradients mapped to lorafleet's factor keys (AdapterWeights.tensors()).

    Shared factors are checked against the sum over experts of PEFT's per-expert gradients
    (the replicated factor's gradient is exactly that sum)."""
    config = fleet.adapters[name]
    r = config.rank
    params = dict(peft_model.named_parameters())
    out = {}
    w = fleet.get_adapter_weights(name)
    for path in w.dense:
        pre = f"base_model.model.{path}"
        out[f"{path}.A"] = params[f"{pre}.lora_A.default.weight"].grad
        out[f"{path}.B"] = params[f"{pre}.lora_B.default.weight"].grad
    for path in w.embeddings:  # PEFT lora.Embedding parameters have no ".weight"
        pre = f"base_model.model.{path}"
        out[f"{path}.A"] = params[f"{pre}.lora_embedding_A.default"].grad
        out[f"{path}.B"] = params[f"{pre}.lora_embedding_B.default"].grad
    shared = SHARED_FACTORS[config.expert_sharing]
    for path, arch in w.experts_arch.items():
        if path not in w.experts:
            continue
        E = arch.num_experts
        pre = f"base_model.model.{path}"
        for proj, key, (sa, sb) in (("gate_up", f"{pre}.base_layer", shared[:2]), ("down", pre, shared[2:])):
            gA = params[f"{key}.lora_A.default.weight"].grad.reshape(E, r, -1)  # expert-slowest
            gB = params[f"{key}.lora_B.default.weight"].grad
            gB = gB.reshape(gB.shape[0], r, E).permute(2, 0, 1)  # expert-fastest
            out[f"{path}.{proj}.A"] = gA.sum(0, keepdim=True) if sa else gA
            out[f"{path}.{proj}.B"] = gB.sum(0, keepdim=True) if sb else gB
    return out


def fleet_grads(fleet: lf.Fleet, name: str) -> dict[str, torch.Tensor]:
    """The fleet's gradients of one adapter, in AdapterWeights layout (rank-sliced)."""
    saved = {}
    for p in fleet.lora_parameters():
        saved[p] = p.data.clone()
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    try:
        return dict(fleet.get_adapter_weights(name).tensors())
    finally:
        for p, d in saved.items():
            p.data.copy_(d)
