"""The one place layers reach kernels through. CPU (and, until the Triton kernels land, CUDA)
runs the plain-torch references."""

from __future__ import annotations

from .grouped_mm.reference import grouped_mm as _grouped_mm_ref
from .segment_lora.reference import Segment, segment_lora as _segment_lora_ref

__all__ = ["Segment", "segment_lora", "grouped_mm"]


def segment_lora(x, A, B, segments):
    return _segment_lora_ref(x, A, B, segments)


def grouped_mm(x, W, offsets, transposed=False):
    return _grouped_mm_ref(x, W, offsets, transposed)
