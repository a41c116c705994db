"""The frozen expert GEMM on ``torch._grouped_mm`` vs the plain-torch reference (CPU runs torch's
own fallback of the op; the GPU runs cuBLAS/CUTLASS): forward and input gradient, both storage
layouts, empty groups, the shapes it refuses, and a whole MoE model through ``Fleet``."""

import pytest
import torch

from lorafleet.kernels import dispatch
from peft_ref import rel


def _run(x, W, offsets, transposed, gy):
    x = x.detach().clone().requires_grad_()
    y = dispatch.grouped_mm(x, W, offsets, transposed)
    y.backward(gy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_torch_grouped_mm_matches_reference(monkeypatch, dtype, tol, transposed):
    g = torch.Generator().manual_seed(0)
    G, IN, OUT, offsets = 5, 48, 40, [0, 7, 7, 30, 51, 51]  # groups 1 and 4 empty
    x = torch.randn(51, IN, generator=g).to(dtype)
    W = torch.randn(*((G, IN, OUT) if transposed else (G, OUT, IN)), generator=g).to(dtype)
    gy = torch.randn(51, OUT, generator=g).to(dtype)
    monkeypatch.setenv("LORAFLEET_GROUPED_MM", "torch")
    y, gx = _run(x, W, offsets, transposed, gy)
    monkeypatch.setenv("LORAFLEET_GROUPED_MM", "auto")
    monkeypatch.setenv("LORAFLEET_KERNELS", "reference")
    y_ref, gx_ref = _run(x.float(), W.float(), offsets, transposed, gy.float())
    assert y.dtype == dtype and rel(y, y_ref) <= tol and rel(gx, gx_ref) <= tol


def test_torch_grouped_mm_refuses_what_it_cannot_do(monkeypatch):
    monkeypatch.setenv("LORAFLEET_GROUPED_MM", "torch")
    x, W = torch.randn(10, 16), torch.randn(2, 24, 16)
    with pytest.raises(ValueError, match="in no group"):
        dispatch.grouped_mm(x, W, [0, 4, 8])
    with pytest.raises(ValueError, match="not multiples"):
        dispatch.grouped_mm(torch.randn(10, 6), torch.randn(2, 24, 6), [0, 4, 10])
    with pytest.raises(ValueError, match="requires grad"):
        dispatch.grouped_mm(x, W.requires_grad_(), [0, 4, 10])
    with pytest.raises(ValueError, match="bad offsets"):
        dispatch.grouped_mm(x, W.detach(), [0, 6, 4])
    monkeypatch.setenv("LORAFLEET_GROUPED_MM", "cublas")
    with pytest.raises(ValueError, match="LORAFLEET_GROUPED_MM"):
        dispatch.grouped_mm(x, W.detach(), [0, 4, 10])
    monkeypatch.setenv("LORAFLEET_GROUPED_MM", "auto")  # CPU tensors: the reference
    assert dispatch.grouped_backend(x, W.detach(), [0, 4, 10]) == "reference"


def test_fleet_moe_on_torch_grouped_mm_matches_reference(monkeypatch):
    """qwen3_moe through Fleet, expert LoRA on: logits and every LoRA gradient are the same
    whether the frozen expert GEMM runs on torch._grouped_mm or on the reference."""
    import lorafleet as lf
    from lorafleet.models.debug import build_debug_model

    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=2, max_rank=4)
    for i, name in enumerate(("a", "b")):
        fleet.add_adapter(name, lf.AdapterConfig(rank=4, alpha=8, experts=True, seed=i))
        w = fleet.get_adapter_weights(name)
        for _, t in w.tensors():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
        fleet.set_adapter_weights(name, w)
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))

    def run(grouped):
        monkeypatch.setenv("LORAFLEET_GROUPED_MM", grouped)
        for p in fleet.lora_parameters():
            p.grad = None
        logits = fleet.forward(ids, adapters=["a", None, "b"]).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in fleet.lora_parameters() if p.grad is not None]

    logits_t, grads_t = run("torch")
    logits_r, grads_r = run("auto")
    assert len(grads_t) == len(grads_r) > 0
    assert rel(logits_t, logits_r) <= 1e-5
    assert max(rel(a, b) for a, b in zip(grads_t, grads_r)) <= 1e-5
