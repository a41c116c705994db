"""``torch.compile`` through the Triton custom ops (fake implementations + registered autograd):
a compiled ``MultiLoRALinear`` and a compiled segmented-LoRA call match eager, gradients included.
CPU runs the kernels in Triton's interpreter (see test_triton_kernels.py for the set-up)."""

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lorafleet.kernels import dispatch  # noqa: E402
from lorafleet.kernels.dispatch import Segment  # noqa: E402
from lorafleet.kernels.segment_lora import triton_kernels as K  # noqa: E402
from lorafleet.lora.routing import Routing, use_routing  # noqa: E402
from lora_layers import random_multilora_linear  # noqa: E402
from peft_ref import rel  # noqa: E402

if DEVICE == "cpu" and not isinstance(K._segment_mm_kernel, InterpretedFunction):
    importlib.reload(K)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNELS", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(fn, leaves, gy):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(gy)
    return [y.detach()] + [t.grad.clone() for t in leaves]


def test_compiled_segment_lora_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 11, generator=g).to(DEVICE).requires_grad_()
    A = torch.randn(3, 5, 11, generator=g).to(DEVICE).requires_grad_()
    B = torch.randn(3, 9, 5, generator=g).to(DEVICE).requires_grad_()
    gy = torch.randn(21, 9, generator=g).to(DEVICE)
    segs = [Segment(0, 6, 0, 0, 5, 2.0), Segment(6, 6, 1, 1, 3, 1.0), Segment(9, 21, 2, 2, 2, 0.5)]
    fn = lambda x, A, B: dispatch.segment_lora(x, A, B, segs)  # noqa: E731
    seen = []

    def backend(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager = _grads(lambda: fn(x, A, B), [x, A, B], gy)
    got = _grads(lambda: compiled(x, A, B), [x, A, B], gy)
    assert any("segment_lora_fwd" in s for s in seen)
    assert max(rel(a, b) for a, b in zip(got, eager)) <= 1e-5
    aot = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _grads(lambda: aot(x, A, B), [x, A, B], gy)
    assert max(rel(a, b) for a, b in zip(got, eager)) <= 1e-5


def test_compiled_multilora_linear_matches_eager():
    layer = random_multilora_linear(16, 12, {0: (4, 2.0), 1: (2, 0.5)}, 3, 4, "model.layers.0.self_attn.q_proj",
                                    DEVICE)
    routing = Routing.from_row_slots([0, 0, -1, 1], DEVICE)
    x = torch.randn(4, 5, 16, device=DEVICE, requires_grad=True)
    gy = torch.randn(4, 5, 12, device=DEVICE)
    leaves = [x, layer.lora_A, layer.lora_B]
    compiled = torch.compile(layer, backend="aot_eager")
    with use_routing(routing):
        eager = _grads(lambda: layer(x), leaves, gy)
        got = _grads(lambda: compiled(x), leaves, gy)
    assert max(rel(a, b) for a, b in zip(got, eager)) <= 1e-5


def test_compiled_fused_lora_linear_matches_eager():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, 13, generator=g).to(DEVICE).requires_grad_()
    W, bias = torch.randn(10, 13, generator=g).to(DEVICE), torch.randn(10, generator=g).to(DEVICE)
    A = torch.randn(2, 4, 13, generator=g).to(DEVICE).requires_grad_()
    B = torch.randn(2, 10, 4, generator=g).to(DEVICE).requires_grad_()
    gy = torch.randn(19, 10, generator=g).to(DEVICE)
    segs = [Segment(2, 11, 1, 1, 4, 2.0), Segment(11, 19, 0, 0, 3, 0.5)]
    fn = lambda x, A, B: dispatch.lora_linear(x, W, bias, A, B, segs)  # noqa: E731
    eager = _grads(lambda: fn(x, A, B), [x, A, B], gy)
    aot = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _grads(lambda: aot(x, A, B), [x, A, B], gy)
    assert max(rel(a, b) for a, b in zip(got, eager)) <= 1e-5
