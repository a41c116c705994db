"""The one place layers reach kernels through.

Backend per call: ``LORAFLEET_KERNELS=reference|triton`` forces one; unset (or ``auto``), CUDA
tensors go to the Triton kernels when ``triton`` is installed, everything else to the plain-torch
references. The Triton path also runs CPU tensors under ``TRITON_INTERPRET=1`` (set before the
kernel modules are first imported), which is how CI tests it. Dtypes the kernels do not take
(float64) always use the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .grouped_mm.reference import grouped_mm as _grouped_mm_ref
from .segment_lora.reference import Segment, segment_lora as _segment_lora_ref

__all__ = ["Segment", "segment_lora", "grouped_mm", "backend"]

ENV = "LORAFLEET_KERNELS"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # found, not imported (imports are slow)


def triton_available() -> bool:
    return _HAS_TRITON


def backend(t: torch.Tensor) -> str:
    """'triton' or 'reference' for a call whose main operand is ``t``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"{ENV}={choice!r}: expected 'reference', 'triton' or 'auto'")
    if choice == "reference" or t.dtype not in _TRITON_DTYPES:
        return "reference"
    if choice == "triton":
        if not triton_available():
            raise ValueError(f"{ENV}=triton but triton is not installed")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(f"{ENV}=triton on {t.device.type} tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if t.device.type == "cuda" and triton_available() else "reference"


def segment_lora(x, A, B, segments):
    if backend(A) == "triton":
        from .segment_lora.triton_op import segment_lora as _tri

        return _tri(x, A, B, segments)
    return _segment_lora_ref(x, A, B, segments)


def grouped_mm(x, W, offsets, transposed=False):
    if backend(W) == "triton":
        from .grouped_mm.triton_op import grouped_mm as _tri

        return _tri(x, W, offsets, transposed)
    return _grouped_mm_ref(x, W, offsets, transposed)
