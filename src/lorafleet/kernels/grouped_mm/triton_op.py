"""Grouped GEMM for the frozen expert weights on the Triton kernels (custom ops, fake impls).

Same semantics as ``reference.grouped_mm``; one launch over all groups::

    y = empty(N, out)
    for g, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        y[start:end] = x[start:end] @ (W[g] if transposed else W[g].T)
    y[offsets[-1]:] = 0

Backward: dX per group (one launch); dW only when W requires grad (one launch over groups).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from ..segment_lora import triton_kernels as K

Tensor = torch.Tensor


@lru_cache(maxsize=256)
def _plans(offsets: tuple, num_rows: int, device: torch.device):
    rows = [(offsets[g], offsets[g + 1], g, g, 0, 1.0) for g in range(len(offsets) - 1)]
    return K.make_plan(rows, num_rows, device), K.make_group_index(rows, 2, len(rows), device)


def _w_strides(W, transposed, for_grad_x):
    """Strides of M[g, k, n] with M[g] = W[g] (transposed storage) or W[g].T, or its transpose."""
    s0, s1, s2 = W.stride()
    return (s0, s1, s2) if transposed != for_grad_x else (s0, s2, s1)


@torch.library.custom_op("lorafleet::grouped_mm_fwd", mutates_args=())
def grouped_mm_fwd(x: Tensor, W: Tensor, offsets: list[int], transposed: bool) -> Tensor:
    plan, _ = _plans(tuple(offsets), x.shape[0], x.device)
    y = K.empty((x.shape[0], W.shape[2] if transposed else W.shape[1]), x)
    return K.segment_mm(x, _w_strides(W, transposed, False), W, y, plan, x.shape[1], g_col=2,
                        k_is_rank=False, n_is_rank=False, use_scale=False)


@grouped_mm_fwd.register_fake
def _(x, W, offsets, transposed):
    return x.new_empty(x.shape[0], W.shape[2] if transposed else W.shape[1])


@torch.library.custom_op("lorafleet::grouped_mm_bwd", mutates_args=())
def grouped_mm_bwd(gy: Tensor, x: Tensor, W: Tensor, offsets: list[int], transposed: bool,
                   need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    plan, groups = _plans(tuple(offsets), x.shape[0], x.device)
    gy = gy.contiguous()
    gx, gW = x.new_empty(0), x.new_empty(0)
    if need_x:
        gx = K.segment_mm(gy, _w_strides(W, transposed, True), W, K.empty(x.shape, x), plan, gy.shape[1],
                          g_col=2, k_is_rank=False, n_is_rank=False, use_scale=False)
    if need_w:
        P, Q = (x, gy) if transposed else (gy, x)
        gW = K.group_outer(P, Q, K.empty(W.shape, W), plan, groups, use_scale=False)
    return gx, gW


@grouped_mm_bwd.register_fake
def _(gy, x, W, offsets, transposed, need_x, need_w):
    return x.new_empty(x.shape if need_x else (0,)), x.new_empty(W.shape if need_w else (0,))


def _setup(ctx, inputs, output):
    x, W, offsets, transposed = inputs
    ctx.offsets, ctx.transposed = offsets, transposed
    ctx.save_for_backward(x, W)


def _backward(ctx, gy):
    x, W = ctx.saved_tensors
    nx, nw = ctx.needs_input_grad[:2]
    gx, gW = grouped_mm_bwd(gy, x, W, ctx.offsets, ctx.transposed, nx, nw)
    return (gx if nx else None), (gW if nw else None), None, None


grouped_mm_fwd.register_autograd(_backward, setup_context=_setup)


def grouped_mm(x: Tensor, W: Tensor, offsets: Sequence[int], transposed: bool = False) -> Tensor:
    """x [N, in] sorted by group; offsets: G+1 host ints, offsets[0] == 0, non-decreasing."""
    offs = [int(o) for o in offsets]
    if len(offs) != W.shape[0] + 1 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])) \
            or offs[-1] > x.shape[0] or x.dim() != 2 or x.shape[1] != (W.shape[1] if transposed else W.shape[2]):
        raise ValueError(f"grouped_mm: bad offsets {offs} for W {tuple(W.shape)} and x {tuple(x.shape)}")
    if x.dtype != W.dtype:
        x = x.to(W.dtype)
    return grouped_mm_fwd(x, W, offs, bool(transposed))
