"""LoRA linear — frozen base GEMM plus segmented LoRA — fused on the Triton kernels, as
``torch.library`` custom ops with fake implementations and a registered autograd formula.
Semantics of ``reference.py``::

    y = x @ W.T + bias
    for seg in segments:
        y[seg.start:seg.end] += seg.scale * (x[seg] @ A[seg.a_index, :seg.rank].T) @ B[seg.b_index, :, :seg.rank].T

Two fusions (``mode``):

- ``"epilogue"``: the base GEMM stays on cuBLAS (``F.linear``); the LoRA expand then adds
  ``scale·S·Bᵀ`` into that output in place, and in backward ``dS·A`` adds into cuBLAS's
  ``dy·W``. Compared with base, delta, add: the delta is never written and read back.
- ``"gemm"`` (LoRAFusion): one Triton pass over ``y`` whose tiles accumulate ``x·Wᵀ`` (+ bias)
  and ``scale·S·Bᵀ`` in fp32 and store once; ``dX = dy·W + dS·A`` likewise in one pass.

Either way: forward = shrink ``S = x·Aᵀ`` + one pass over ``y``; backward = ``dS = scale·dy·B``,
the ``dX`` pass, ``dA``, ``dB`` (as in ``segment_lora``). ``W`` and ``bias`` are frozen: no
gradient is computed for them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..segment_lora import triton_kernels as K
from ..segment_lora.triton_op import _shrink, check_segments

Tensor = torch.Tensor

# Row tile of the "gemm" pass: the base GEMM dominates it, and wants taller tiles than the LoRA's
# (64 rows: Hopper's wgmma); the "epilogue" passes are memory-bound and keep the LoRA's tiles.
FUSED_BLOCK_M = 64


@lru_cache(maxsize=256)
def _plans(meta: tuple, scales: tuple, num_rows: int, ga: int, gb: int, device: torch.device, block_m: int):
    rows = [(*meta[i : i + 5], scales[i // 5]) for i in range(0, len(meta), 5)]
    plan = K.make_plan(rows, num_rows, device, block_m=block_m)
    return plan, K.make_group_index(rows, 2, ga, device), K.make_group_index(rows, 3, gb, device)


def _get_plans(x, A, B, meta, scales, gemm):
    return _plans(tuple(meta), tuple(float(s) for s in scales), x.shape[0], A.shape[0], B.shape[0], x.device,
                  FUSED_BLOCK_M if gemm else K.BLOCK_M)


@torch.library.custom_op("lorafleet::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, meta: list[int],
                    scales: list[float], gemm: bool) -> tuple[Tensor, Tensor]:
    plan, _, _ = _get_plans(x, A, B, meta, scales, gemm)
    S = _shrink(x, A, plan)
    b = B.stride()
    if gemm:
        y = K.empty((x.shape[0], W.shape[0]), x)
        base = (x, W, (W.stride(1), W.stride(0)), bias)
    else:
        y, base = F.linear(x, W, bias), None  # cuBLAS; the expand adds into it
    K.segment_mm(S, (b[0], b[2], b[1]), B, y, plan, S.shape[1], g_col=3, k_is_rank=True, n_is_rank=False,
                 use_scale=True, accumulate=not gemm, base=base)
    return y, S


@lora_linear_fwd.register_fake
def _(x, W, bias, A, B, meta, scales, gemm):
    return x.new_empty(x.shape[0], W.shape[0]), x.new_empty(x.shape[0], A.shape[1])


@torch.library.custom_op("lorafleet::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(gy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, S: Tensor, meta: list[int],
                    scales: list[float], gemm: bool, need_x: bool, need_a: bool,
                    need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    plan, ga, gb = _get_plans(x, A, B, meta, scales, gemm)
    gy = gy.contiguous()
    gx, gA, gB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x or need_a:
        b = B.stride()
        dS = K.empty(S.shape, S)
        K.segment_mm(gy, (b[0], b[1], b[2]), B, dS, plan, gy.shape[1], g_col=3, k_is_rank=False,
                     n_is_rank=True, use_scale=True)
        if need_x:
            a = A.stride()
            if gemm:
                gx, base = K.empty(x.shape, x), (gy, W, (W.stride(0), W.stride(1)), None)
            else:
                gx, base = gy @ W, None  # cuBLAS; dS·A adds into it
            K.segment_mm(dS, (a[0], a[1], a[2]), A, gx, plan, dS.shape[1], g_col=2, k_is_rank=True,
                         n_is_rank=False, use_scale=False, accumulate=not gemm, base=base)
        if need_a:
            gA = K.group_outer(dS, x, K.empty(A.shape, A), plan, ga, use_scale=False)
    if need_b:
        gB = K.group_outer(gy, S, K.empty(B.shape, B), plan, gb, use_scale=True)
    return gx, gA, gB


@lora_linear_bwd.register_fake
def _(gy, x, W, A, B, S, meta, scales, gemm, need_x, need_a, need_b):
    return tuple(x.new_empty(t.shape if need else (0,)) for t, need in ((x, need_x), (A, need_a), (B, need_b)))


def _setup(ctx, inputs, output):
    x, W, bias, A, B, meta, scales, gemm = inputs
    ctx.meta, ctx.scales, ctx.gemm = meta, scales, gemm
    ctx.save_for_backward(x, W, A, B, output[1])


def _backward(ctx, gy, _gS):
    x, W, A, B, S = ctx.saved_tensors
    nx, nw, nbias, na, nb = ctx.needs_input_grad[:5]
    assert not (nw or nbias), "lora_linear: the base weight and bias are frozen (dispatch checks this)"
    gx, gA, gB = lora_linear_bwd(gy, x, W, A, B, S, ctx.meta, ctx.scales, ctx.gemm, nx, na, nb)
    return (gx if nx else None), None, None, (gA if na else None), (gB if nb else None), None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


def lora_linear(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, segments: Sequence,
                mode: str = "epilogue") -> Tensor:
    """Differentiable fused LoRA linear on Triton (see module docstring). x [N, in] -> [N, out]."""
    if mode not in ("epilogue", "gemm"):
        raise ValueError(f"lora_linear: mode {mode!r}, expected 'epilogue' or 'gemm'")
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
    y, _ = lora_linear_fwd(x, W, bias, A, B, meta, [float(s.scale) for s in segments], mode == "gemm")
    return y
