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

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..segment_lora import triton_kernels as K
from ..segment_lora.triton_op import _expand, _shrink, backward_products, check_segments
from ..segment_lora.triton_op import _get_plans as _get_lora_plans

Tensor = torch.Tensor

# Row tile of the "gemm" pass: the base GEMM dominates it, and wants taller tiles than the LoRA's
# (64 rows: Hopper's wgmma); the "epilogue" passes are memory-bound and keep the LoRA's tiles.
FUSED_BLOCK_M = 64


def _get_plans(x, A, B, meta, scales, gemm):
    return _get_lora_plans(x, A, B, meta, scales, FUSED_BLOCK_M if gemm else K.BLOCK_M)


@torch.library.custom_op("lorafleet::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, meta: list[int],
                    scales: list[float], gemm: bool) -> tuple[Tensor, Tensor]:
    plan, _, _ = _get_plans(x, A, B, meta, scales, gemm)
    S = _shrink(x, A, plan)
    if gemm:
        y, base = K.empty((x.shape[0], W.shape[0]), x), (x, W, (W.stride(1), W.stride(0)), bias)
    else:
        y, base = F.linear(x, W, bias), None  # cuBLAS; the expand adds into it
    return _expand(S, B, plan, out=y, accumulate=not gemm, base=base), S


@lora_linear_fwd.register_fake
def _(x, W, bias, A, B, meta, scales, gemm):
    return x.new_empty(x.shape[0], W.shape[0]), x.new_empty(x.shape[0], A.shape[1])


@torch.library.custom_op("lorafleet::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(gy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, S: Tensor, meta: list[int],
                    scales: list[float], gemm: bool, need_x: bool, need_a: bool,
                    need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    plans = _get_plans(x, A, B, meta, scales, gemm)
    if gemm:
        gx, base = None, (gy, W, (W.stride(0), W.stride(1)), None)
    else:
        gx, base = (gy @ W if need_x else None), None  # cuBLAS; dS·A adds into it
    return backward_products(gy, x, A, B, S, plans, need_x, need_a, need_b, gx=gx, accumulate=not gemm,
                             dx_base=base)


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
