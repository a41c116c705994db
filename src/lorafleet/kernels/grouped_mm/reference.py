"""Grouped matrix product for the frozen expert weights, plain torch.

Semantics::

    y = empty(N, out)
    for g, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        y[start:end] = x[start:end] @ (W[g] if transposed else W[g].T)
    return y

``W`` is ``[G, out, in]`` (``[G, in, out]`` when ``transposed``, GPT-OSS storage). Rows are
sorted by group. The weight gradient is produced only when asked for (base weights are frozen).
"""

from __future__ import annotations

from typing import Sequence

import torch


def _wt(W, g, transposed):
    return W[g] if transposed else W[g].t()  # [in, out]


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, offsets, transposed):
        out_dim = W.shape[2] if transposed else W.shape[1]
        pieces = [x[offsets[g] : offsets[g + 1]] @ _wt(W, g, transposed)
                  for g in range(len(offsets) - 1) if offsets[g] < offsets[g + 1]]
        if offsets[-1] < x.shape[0]:
            pieces.append(x.new_zeros(x.shape[0] - offsets[-1], out_dim))
        y = torch.cat(pieces) if pieces else x.new_zeros(x.shape[0], out_dim)
        ctx.offsets, ctx.transposed = offsets, transposed
        ctx.save_for_backward(x, W)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, W = ctx.saved_tensors
        offsets, transposed = ctx.offsets, ctx.transposed
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gW = torch.zeros_like(W) if ctx.needs_input_grad[1] else None
        gy = gy.contiguous()
        for g in range(len(offsets) - 1):
            s, e = offsets[g], offsets[g + 1]
            if s == e:
                continue
            w = _wt(W, g, transposed)  # [in, out]
            if gx is not None:
                gx[s:e] = gy[s:e] @ w.t()
            if gW is not None:
                gw = x[s:e].t() @ gy[s:e]  # [in, out]
                gW[g] += gw if transposed else gw.t()
        return gx, gW, None, None


def grouped_mm(x: torch.Tensor, W: torch.Tensor, offsets: Sequence[int], transposed: bool = False):
    """x [N, in] sorted by group; offsets: G+1 host ints with offsets[0] == 0."""
    assert len(offsets) == W.shape[0] + 1 and offsets[0] == 0, (len(offsets), W.shape)
    if x.dtype != W.dtype:
        x = x.to(W.dtype)
    return _GroupedMM.apply(x, W, tuple(int(o) for o in offsets), transposed)
