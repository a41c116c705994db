"""Reference kernels vs their literal loops: forward and every gradient, odd shapes, mixed ranks,
empty segments, an adapter with zero tokens, outputs poisoned with NaN."""

import pytest
import torch

from lorafleet.kernels.dispatch import Segment, grouped_mm, segment_lora
from lorafleet.kernels.grouped_mm.reference import _GroupedMM
from lorafleet.kernels.segment_lora.reference import segment_lora_forward, segment_lora_loop


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _segments(bounds, ranks, scales, a_idx=None, b_idx=None):
    segs = []
    for i, ((s, e), r, sc) in enumerate(zip(bounds, ranks, scales)):
        segs.append(Segment(s, e, a_idx[i] if a_idx else i, b_idx[i] if b_idx else i, r, sc))
    return segs


@pytest.mark.parametrize("gap", [False, True])
def test_segment_lora_matches_loop_forward_and_grads(gap):
    torch.manual_seed(0)
    N, IN, OUT, G, R = 37, 19, 23, 5, 7
    # odd bounds; segment 2 is empty (zero tokens), rows 30..36 belong to no adapter when gap
    bounds = [(0, 5), (5, 17), (17, 17), (17, 30), (30, 37 if not gap else 30)]
    ranks, scales = [7, 1, 3, 4, 2], [2.0, 0.5, 1.0, 1.5, 3.0]
    segs = _segments(bounds, ranks, scales)
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    A = torch.randn(G, R, IN, dtype=torch.float64, requires_grad=True)
    B = torch.randn(G, OUT, R, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(N, OUT, dtype=torch.float64)
    y = segment_lora(x, A, B, segs)
    y.backward(gy)
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    y_ref = segment_lora_loop(x, A, B, segs)
    y_ref.backward(gy)
    assert rel(y, y_ref) < 1e-12
    for g, t in zip(grads, (x, A, B)):
        assert rel(g, t.grad) < 1e-12
    # rank padding never gets gradient
    for seg in segs:
        assert grads[1][seg.a_index, seg.rank:].abs().sum() == 0
        assert grads[2][seg.b_index, :, seg.rank:].abs().sum() == 0
    if gap:
        assert y[30:].abs().sum() == 0 and grads[0][30:].abs().sum() == 0


def test_segment_lora_writes_every_row_nan_poison():
    torch.manual_seed(1)
    x, A, B = torch.randn(11, 6), torch.randn(3, 4, 6), torch.randn(3, 5, 4)
    segs = _segments([(2, 6), (6, 6), (8, 10)], [4, 2, 3], [1.0, 1.0, 0.5])
    out = torch.full((11, 5), float("nan"))
    y, _ = segment_lora_forward(x, A, B, segs, out=out)
    assert torch.isfinite(y).all()
    assert rel(y, segment_lora_loop(x, A, B, segs)) < 1e-6


def test_segment_lora_shared_factor_indices():
    """Expert LoRA: several segments read one shared A (same a_index, different b_index)."""
    torch.manual_seed(2)
    x = torch.randn(13, 9, requires_grad=True)
    A = torch.randn(4, 3, 9, requires_grad=True)
    B = torch.randn(4, 8, 3, requires_grad=True)
    segs = _segments([(0, 4), (4, 9), (9, 13)], [3, 3, 2], [1.0, 1.0, 2.0], a_idx=[0, 0, 2], b_idx=[1, 3, 2])
    y = segment_lora(x, A, B, segs)
    gy = torch.randn_like(y)
    y.backward(gy)
    g = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    segment_lora_loop(x, A, B, segs).backward(gy)
    for a, t in zip(g, (x, A, B)):
        assert rel(a, t.grad) < 1e-5
    assert g[1][1].abs().sum() == 0 and g[1][3].abs().sum() == 0  # unused factors: no gradient


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_matches_loop(transposed):
    torch.manual_seed(3)
    G, IN, OUT = 5, 13, 7
    offsets = [0, 3, 3, 10, 21, 21]  # empty groups 1 and 4
    x = torch.randn(23, IN, dtype=torch.float64, requires_grad=True)  # rows 21, 22 in no group
    W = torch.randn(G, IN, OUT, dtype=torch.float64) if transposed else torch.randn(G, OUT, IN, dtype=torch.float64)
    W.requires_grad_(True)
    y = grouped_mm(x, W, offsets, transposed)
    gy = torch.randn_like(y)
    y.backward(gy)
    gx, gW = x.grad.clone(), W.grad.clone()
    x.grad = W.grad = None
    parts = [x[offsets[g]:offsets[g + 1]] @ (W[g] if transposed else W[g].t()) for g in range(G)]
    ref = torch.cat(parts + [x.new_zeros(2, OUT)])
    ref.backward(gy)
    assert rel(y, ref) < 1e-12 and rel(gx, x.grad) < 1e-12 and rel(gW, W.grad) < 1e-12
    assert torch.isfinite(y).all()


def test_grouped_mm_frozen_weight_gets_no_grad_work():
    x = torch.randn(6, 4, requires_grad=True)
    W = torch.randn(2, 3, 4)
    y = _GroupedMM.apply(x, W, (0, 2, 6), False)
    y.sum().backward()
    assert W.grad is None and x.grad is not None
