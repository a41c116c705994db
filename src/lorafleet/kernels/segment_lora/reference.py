"""Segmented (multi-adapter / adapter×expert) LoRA, plain torch: the oracle for every kernel.

A *segment* is a run of rows of ``x`` that use the same pair of low-rank factors::

    Segment(start, end, a_index, b_index, rank, scale)

Semantics (the whole op, as a Python loop)::

    y = zeros(N, out)
    for seg in segments:
        xs = x[seg.start:seg.end]                                  # [n, in]
        u = xs @ A[seg.a_index, :seg.rank].T                       # [n, rank]   (shrink)
        y[seg.start:seg.end] = seg.scale * u @ B[seg.b_index, :, :seg.rank].T   # (expand)
    return y

Rows outside every segment get zero. ``A`` is ``[G_A, R, in]`` and ``B`` is ``[G_B, out, R]`` with
``R >= rank`` (rank padding is never read, so it never receives gradient). Dense multi-LoRA uses
``G = slots`` and ``a_index = b_index = slot``; expert LoRA flattens ``(slot, expert)`` into the
group index, and a factor shared by all experts simply repeats one index.

The backward is written out so gradients land in one preallocated tensor each: indexing a slot
out of the stacked bank through autograd would allocate a full-bank zero gradient per segment.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Segment(NamedTuple):
    start: int
    end: int
    a_index: int
    b_index: int
    rank: int
    scale: float


def segment_lora_forward(x, A, B, segments: Sequence[Segment], out=None):
    """y[seg] = scale * (x[seg] @ A[a].T[:, :r]) @ B[b, :, :r].T; returns (y, shrink outputs).

    Pieces are computed as plain products and joined by one ``cat``: ``mm(out=<view>)`` is
    orders of magnitude slower on a busy multi-threaded CPU."""
    N, out_dim = x.shape[0], B.shape[1]
    order = sorted(range(len(segments)), key=lambda i: segments[i].start)
    shrinks: list = [None] * len(segments)
    pieces, covered = [], 0
    for i in order:
        seg = segments[i]
        assert seg.start >= covered, f"overlapping segments at row {seg.start}"
        if seg.start > covered:  # rows no adapter owns (base-model rows)
            pieces.append(x.new_zeros(seg.start - covered, out_dim))
        u = x[seg.start : seg.end] @ A[seg.a_index, : seg.rank].t()
        shrinks[i] = u
        pieces.append((u @ B[seg.b_index, :, : seg.rank].t()).mul_(seg.scale))
        covered = seg.end
    if covered < N:
        pieces.append(x.new_zeros(N - covered, out_dim))
    y = torch.cat(pieces) if pieces else x.new_zeros(N, out_dim)
    if out is not None:
        out.copy_(y)
        y = out
    return y, shrinks


def segment_lora_backward(grad_y, x, A, B, segments, shrinks, need_x, need_a, need_b):
    gx = torch.zeros_like(x) if need_x else None
    gA = torch.zeros_like(A) if need_a else None
    gB = torch.zeros_like(B) if need_b else None
    for seg, u in zip(segments, shrinks):
        s, e, r = seg.start, seg.end, seg.rank
        gy = grad_y[s:e] * seg.scale  # [n, out]
        b = B[seg.b_index, :, :r]  # [out, r]
        gu = gy @ b  # [n, r]
        if need_b:
            gB[seg.b_index, :, :r] += gy.t() @ u
        if need_a:
            gA[seg.a_index, :r] += gu.t() @ x[s:e]
        if need_x:
            gx[s:e] += gu @ A[seg.a_index, :r]
    return gx, gA, gB


class _SegmentLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, segments):
        y, shrinks = segment_lora_forward(x, A, B, segments)
        ctx.segments = segments
        ctx.save_for_backward(x, A, B, *shrinks)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, *shrinks = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        gx, gA, gB = segment_lora_backward(
            grad_y.contiguous(), x, A, B, ctx.segments, shrinks, need_x, need_a, need_b
        )
        return gx, gA, gB, None


def segment_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, segments: Sequence[Segment]):
    """Differentiable segmented LoRA (see module docstring). x [N, in] -> [N, out]."""
    assert x.dim() == 2 and A.dim() == 3 and B.dim() == 3, (x.shape, A.shape, B.shape)
    assert A.shape[2] == x.shape[1] and A.shape[1] == B.shape[2], (x.shape, A.shape, B.shape)
    if A.dtype != x.dtype:
        x = x.to(A.dtype)
    return _SegmentLoRA.apply(x, A, B, tuple(segments))


def segment_lora_loop(x, A, B, segments):
    """The literal loop of the module docstring through autograd (slow; for tests only)."""
    y = x.new_zeros(x.shape[0], B.shape[1])
    parts = []
    for seg in segments:
        u = x[seg.start : seg.end] @ A[seg.a_index, : seg.rank].t()
        parts.append((seg, seg.scale * (u @ B[seg.b_index, :, : seg.rank].t())))
    for seg, p in parts:
        y = torch.cat([y[: seg.start], p, y[seg.end :]])
    return y
