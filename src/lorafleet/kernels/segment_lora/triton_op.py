"""Segmented LoRA on the Triton kernels, as ``torch.library`` custom ops with fake implementations
(so ``torch.compile`` traces through them) and a registered autograd formula.

Same semantics and gradients as ``reference.segment_lora``::

    y = zeros(N, out)
    for seg in segments:
        u = x[seg.start:seg.end] @ A[seg.a_index, :seg.rank].T          # shrink: 1 launch, all segments
        y[seg.start:seg.end] = seg.scale * u @ B[seg.b_index, :, :seg.rank].T   # expand: 1 launch

Backward (4 launches): dS = scale * dy @ B[b, :, :r];  dX = dS @ A[a, :r];
dA[a, :r] = sum over segments of a: dS.T @ x;  dB[b, :, :r] = sum over segments of b: scale * dy.T @ S.
Gradients land in full-bank tensors; factor indices no segment uses get zeros.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from . import triton_kernels as K

Tensor = torch.Tensor


@lru_cache(maxsize=256)
def _plans(meta: tuple, scales: tuple, num_rows: int, ga: int, gb: int, device: torch.device, block_m: int):
    rows = [(*meta[i : i + 5], scales[i // 5]) for i in range(0, len(meta), 5)]
    plan = K.make_plan(rows, num_rows, device, block_m=block_m)
    return plan, K.make_group_index(rows, 2, ga, device), K.make_group_index(rows, 3, gb, device)


def _get_plans(x, A, B, meta, scales, block_m: int = K.BLOCK_M):
    """(tile plan, segments by A index, segments by B index), cached per distinct routing."""
    return _plans(tuple(meta), tuple(float(s) for s in scales), x.shape[0], A.shape[0], B.shape[0], x.device,
                  block_m)


def _shrink(x, A, plan, out=None):
    """S [N, R] = x[seg] @ A[a, :rank].T per segment (columns rank..R zero; gap rows unwritten)."""
    S = K.empty((x.shape[0], A.shape[1]), x) if out is None else out
    a = A.stride()
    return K.segment_mm(x, (a[0], a[2], a[1]), A, S, plan, x.shape[1], g_col=2, k_is_rank=False,
                        n_is_rank=True, use_scale=False)


def _expand(S, B, plan, out=None, accumulate=False, base=None):
    """y [N, out] = scale * S[seg, :rank] @ B[b, :, :rank].T (rows of no segment: 0); added into
    ``out`` with ``accumulate``; plus a base product with ``base`` (see ``K.segment_mm``)."""
    y = K.empty((S.shape[0], B.shape[1]), S) if out is None else out
    b = B.stride()
    return K.segment_mm(S, (b[0], b[2], b[1]), B, y, plan, S.shape[1], g_col=3, k_is_rank=True,
                        n_is_rank=False, use_scale=True, accumulate=accumulate, base=base)


def backward_products(gy, x, A, B, S, plans, need_x, need_a, need_b, gx=None, accumulate=False, dx_base=None):
    """(dX, dA, dB) of segmented LoRA, each an empty tensor where not needed: dS = scale·dy·B, then
    dX = dS·A (into a fresh buffer; added into ``gx`` with ``accumulate``; plus ``dx_base``, a
    base product as in ``K.segment_mm``), dA = Σ dSᵀ·x and dB = Σ scale·dyᵀ·S per factor index."""
    plan, ga, gb = plans
    gy = gy.contiguous()
    gA, gB = x.new_empty(0), x.new_empty(0)
    if need_x or need_a:
        b = B.stride()
        dS = K.empty(S.shape, S)
        K.segment_mm(gy, (b[0], b[1], b[2]), B, dS, plan, gy.shape[1], g_col=3, k_is_rank=False,
                     n_is_rank=True, use_scale=True)
        if need_x:
            a = A.stride()
            gx = K.empty(x.shape, x) if gx is None else gx
            K.segment_mm(dS, (a[0], a[1], a[2]), A, gx, plan, dS.shape[1], g_col=2, k_is_rank=True,
                         n_is_rank=False, use_scale=False, accumulate=accumulate, base=dx_base)
        if need_a:
            gA = K.group_outer(dS, x, K.empty(A.shape, A), plan, ga, use_scale=False)
    if need_b:
        gB = K.group_outer(gy, S, K.empty(B.shape, B), plan, gb, use_scale=True)
    return (gx if need_x else x.new_empty(0)), gA, gB


@torch.library.custom_op("lorafleet::segment_lora_fwd", mutates_args=())
def segment_lora_fwd(x: Tensor, A: Tensor, B: Tensor, meta: list[int], scales: list[float]) -> tuple[Tensor, Tensor]:
    plan, _, _ = _get_plans(x, A, B, meta, scales)
    S = _shrink(x, A, plan)
    return _expand(S, B, plan), S


@segment_lora_fwd.register_fake
def _(x, A, B, meta, scales):
    return x.new_empty(x.shape[0], B.shape[1]), x.new_empty(x.shape[0], A.shape[1])


@torch.library.custom_op("lorafleet::segment_lora_bwd", mutates_args=())
def segment_lora_bwd(
    gy: Tensor, x: Tensor, A: Tensor, B: Tensor, S: Tensor, meta: list[int], scales: list[float],
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return backward_products(gy, x, A, B, S, _get_plans(x, A, B, meta, scales), need_x, need_a, need_b)


@segment_lora_bwd.register_fake
def _(gy, x, A, B, S, meta, scales, need_x, need_a, need_b):
    return tuple(x.new_empty(t.shape if need else (0,)) for t, need in ((x, need_x), (A, need_a), (B, need_b)))


def _setup(ctx, inputs, output):
    x, A, B, meta, scales = inputs
    ctx.meta, ctx.scales = meta, scales
    ctx.save_for_backward(x, A, B, output[1])


def _backward(ctx, gy, _gS):
    x, A, B, S = ctx.saved_tensors
    nx, na, nb = ctx.needs_input_grad[:3]
    gx, gA, gB = segment_lora_bwd(gy, x, A, B, S, ctx.meta, ctx.scales, nx, na, nb)
    return (gx if nx else None), (gA if na else None), (gB if nb else None), None, None


segment_lora_fwd.register_autograd(_backward, setup_context=_setup)


def check_segments(x, A, B, segments) -> None:
    """User errors (ValueError) that the kernels cannot detect themselves."""
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3 or A.shape[2] != x.shape[1] or A.shape[1] != B.shape[2]:
        raise ValueError(f"segment_lora: bad shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    N, R = x.shape[0], A.shape[1]
    for s in segments:
        if not (0 <= s.start <= s.end <= N and 0 <= s.a_index < A.shape[0] and 0 <= s.b_index < B.shape[0]
                and 0 <= s.rank <= R):
            raise ValueError(f"segment_lora: segment {s} out of range for x {tuple(x.shape)}, A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")


def segment_lora(x: Tensor, A: Tensor, B: Tensor, segments: Sequence) -> Tensor:
    """Differentiable segmented LoRA on Triton (see module docstring). x [N, in] -> [N, out]."""
    check_segments(x, A, B, segments)
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    if B.dtype != A.dtype:
        raise ValueError(f"segment_lora: A is {A.dtype} but B is {B.dtype}")
    meta = [int(v) for s in segments for v in (s.start, s.end, s.a_index, s.b_index, s.rank)]
    y, _ = segment_lora_fwd(x, A, B, meta, [float(s.scale) for s in segments])
    return y
