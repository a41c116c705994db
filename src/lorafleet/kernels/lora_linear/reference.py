"""Fused LoRA linear — frozen base linear plus segmented LoRA — plain torch: the oracle.

Semantics (the whole op, as a Python loop)::

    y = x @ W.T + (bias if bias is not None else 0)          # every row: the frozen base
    for seg in segments:
        u = x[seg.start:seg.end] @ A[seg.a_index, :seg.rank].T
        y[seg.start:seg.end] += seg.scale * u @ B[seg.b_index, :, :seg.rank].T
    return y

``W`` [out, in] and ``bias`` [out] are frozen (no gradient is computed for them); ``x``, ``A``
and ``B`` get theirs. This reference is literally the unfused composition the layers ran before
(base GEMM, segmented LoRA, add), so it defines what the fused kernel must reproduce.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..segment_lora.reference import Segment, segment_lora


def lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """x [N, in] -> [N, out] (see module docstring)."""
    y = F.linear(x, W, bias)
    if not segments:
        return y
    return y + segment_lora(x, A, B, segments).to(y.dtype)
