"""Fused LoRA linear on the Triton kernels (LoRAFusion's technique), as ``torch.library`` custom
ops with fake implementations and a registered autograd formula. Semantics of ``reference.py``::

    y = x @ W.T + bias
    for seg in segments:
        y[seg.start:seg.end] += seg.scale * (x[seg] @ A[seg.a_index, :seg.rank].T) @ B[seg.b_index, :, :seg.rank].T

Forward, 2 launches: ``S = x·Aᵀ`` per segment (the shrink), then one pass over ``y`` whose tiles
accumulate ``x·Wᵀ`` and ``scale·S·Bᵀ`` (+ bias) in fp32 and store once — no separate LoRA delta is
written, re-read and added. Backward, 4 launches: ``dS = scale·dy·B``; ``dX = dy·W + dS·A`` in one
pass (the base input gradient and the LoRA one share the tile); ``dA``, ``dB`` as in
``segment_lora``. ``W`` and ``bias`` are frozen: no gradient is computed for them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch

from ..segment_lora import triton_kernels as K
from ..segment_lora.triton_op import _shrink, check_segments

Tensor = torch.Tensor

# Row tile of the fused pass: the base GEMM dominates it, and wants taller tiles than the LoRA's.
FUSED_BLOCK_M = 64


@lru_cache(maxsize=256)
def _plans(meta: tuple, scales: tuple, num_rows: int, ga: int, gb: int, device: torch.device):
    rows = [(*meta[i : i + 5], scales[i // 5]) for i in range(0, len(meta), 5)]
    plan = K.make_plan(rows, num_rows, device, block_m=FUSED_BLOCK_M)
    return plan, K.make_group_index(rows, 2, ga, device), K.make_group_index(rows, 3, gb, device)


def _get_plans(x, A, B, meta, scales):
    return _plans(tuple(meta), tuple(float(s) for s in scales), x.shape[0], A.shape[0], B.shape[0], x.device)


@torch.library.custom_op("lorafleet::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, meta: list[int],
                    scales: list[float]) -> tuple[Tensor, Tensor]:
    plan, _, _ = _get_plans(x, A, B, meta, scales)
    S = _shrink(x, A, plan)
    y = K.empty((x.shape[0], W.shape[0]), x)
    b = B.stride()
    K.segment_mm(S, (b[0], b[2], b[1]), B, y, plan, S.shape[1], g_col=3, k_is_rank=True, n_is_rank=False,
                 use_scale=True, base=(x, W, (W.stride(1), W.stride(0)), bias))
    return y, S


@lora_linear_fwd.register_fake
def _(x, W, bias, A, B, meta, scales):
    return x.new_empty(x.shape[0], W.shape[0]), x.new_empty(x.shape[0], A.shape[1])


@torch.library.custom_op("lorafleet::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(gy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, S: Tensor, meta: list[int],
                    scales: list[float], need_x: bool, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    plan, ga, gb = _get_plans(x, A, B, meta, scales)
    gy = gy.contiguous()
    gx, gA, gB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x or need_a:
        b = B.stride()
        dS = K.empty(S.shape, S)
        K.segment_mm(gy, (b[0], b[1], b[2]), B, dS, plan, gy.shape[1], g_col=3, k_is_rank=False,
                     n_is_rank=True, use_scale=True)
        if need_x:
            a = A.stride()
            gx = K.empty(x.shape, x)
            K.segment_mm(dS, (a[0], a[1], a[2]), A, gx, plan, dS.shape[1], g_col=2, k_is_rank=True,
                         n_is_rank=False, use_scale=False, base=(gy, W, (W.stride(0), W.stride(1)), None))
        if need_a:
            gA = K.group_outer(dS, x, K.empty(A.shape, A), plan, ga, use_scale=False)
    if need_b:
        gB = K.group_outer(gy, S, K.empty(B.shape, B), plan, gb, use_scale=True)
    return gx, gA, gB


@lora_linear_bwd.register_fake
def _(gy, x, W, A, B, S, meta, scales, need_x, need_a, need_b):
    return tuple(x.new_empty(t.shape if need else (0,)) for t, need in ((x, need_x), (A, need_a), (B, need_b)))


def _setup(ctx, inputs, output):
    x, W, bias, A, B, meta, scales = inputs
    ctx.meta, ctx.scales = meta, scales
    ctx.save_for_backward(x, W, A, B, output[1])


def _backward(ctx, gy, _gS):
    x, W, A, B, S = ctx.saved_tensors
    nx, nw, nbias, na, nb = ctx.needs_input_grad[:5]
    assert not (nw or nbias), "lora_linear: the base weight and bias are frozen (dispatch checks this)"
    gx, gA, gB = lora_linear_bwd(gy, x, W, A, B, S, ctx.meta, ctx.scales, nx, na, nb)
    return (gx if nx else None), None, None, (gA if na else None), (gB if nb else None), None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


def lora_linear(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, segments: Sequence) -> Tensor:
    """Differentiable fused LoRA linear on Triton (see module docstring). x [N, in] -> [N, out]."""
    check_segments(x, A, B, segments)
    if W.dim() != 2 or W.shape[1] != x.shape[1] or B.shape[1] != W.shape[0] or (
            bias is not None and tuple(bias.shape) != (W.shape[0],)):
        raise ValueError(f"lora_linear: bad shapes x {tuple(x.shape)}, W {tuple(W.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}, B {tuple(B.shape)}")
    if W.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the fused op computes no gradient for the base weight or bias; "
                         "freeze them (requires_grad=False) or use the unfused path")
    dtypes = {x.dtype, W.dtype, A.dtype, B.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(f"lora_linear: x, W, bias, A and B must share one dtype, got {sorted(map(str, dtypes))}")
    meta = [int(v) for s in segments for v in (s.start, s.end, s.a_index, s.b_index, s.rank)]
    y, _ = lora_linear_fwd(x, W, bias, A, B, meta, [float(s.scale) for s in segments])
    return y
