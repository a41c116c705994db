"""The frozen expert GEMM on ``torch._grouped_mm`` (cuBLAS / CUTLASS grouped GEMM on Hopper).

Same semantics as ``reference.grouped_mm`` when every row belongs to a group::

    for g, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        y[start:end] = x[start:end] @ (W[g] if transposed else W[g].T)

It is the library grouped GEMM that Hugging Face's and torchtitan's MoE fast paths call, for the
frozen base only: the LoRA factors still go through the segment kernels. Constraints of
``torch._grouped_mm`` (checked by ``unsupported``): row strides that are multiples of 16 bytes,
and no trailing rows outside the groups. The weight gets no gradient (frozen base).
"""

from __future__ import annotations

from typing import Sequence

import torch


def unsupported(x: torch.Tensor, W: torch.Tensor, offsets: Sequence[int], transposed: bool) -> str | None:
    """Why ``torch._grouped_mm`` cannot run this call, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if W.requires_grad:
        return "the expert weight requires grad (this path computes no weight gradient)"
    if offsets[-1] != x.shape[0]:
        return f"rows {offsets[-1]}..{x.shape[0]} are in no group"
    size = W.element_size()
    in_dim, out_dim = (W.shape[1], W.shape[2]) if transposed else (W.shape[2], W.shape[1])
    if (in_dim * size) % 16 or (out_dim * size) % 16:
        return f"expert dims {in_dim}→{out_dim} are not multiples of {16 // size} {W.dtype} elements"
    return None


class _TorchGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_kn, offs):
        ctx.save_for_backward(W_kn, offs)
        return torch._grouped_mm(x, W_kn, offs=offs)

    @staticmethod
    def backward(ctx, gy):
        W_kn, offs = ctx.saved_tensors
        gx = torch._grouped_mm(gy.contiguous(), W_kn.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None
        return gx, None, None


def grouped_mm(x: torch.Tensor, W: torch.Tensor, offsets: Sequence[int], transposed: bool = False) -> torch.Tensor:
    """x [N, in] sorted by group; offsets: G+1 host ints (see ``unsupported`` for the limits)."""
    offs = [int(o) for o in offsets]
    if len(offs) != W.shape[0] + 1 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"grouped_mm: bad offsets {offs} for W {tuple(W.shape)}")
    why = unsupported(x, W, offs, transposed)
    if why:
        raise ValueError(f"grouped_mm on torch._grouped_mm: {why}")
    if x.dtype != W.dtype:
        x = x.to(W.dtype)
    ends = torch.tensor(offs[1:], dtype=torch.int32).to(x.device, non_blocking=True)
    return _TorchGroupedMM.apply(x.contiguous(), W if transposed else W.transpose(1, 2), ends)
