"""The one place layers reach kernels through.

Backend per call: ``LORAFLEET_KERNELS=reference|triton`` forces one; unset (or ``auto``), CUDA
tensors go to the Triton kernels when ``triton`` is installed, everything else to the plain-torch
references. The Triton path also runs CPU tensors under ``TRITON_INTERPRET=1`` (set before the
kernel modules are first imported), which is how CI tests it. Dtypes the kernels do not take
(float64) always use the reference.

``LORAFLEET_FUSE_BASE`` decides how ``MultiLoRALinear`` joins its frozen base GEMM and the LoRA on
the Triton backend (``lora_linear``):

- ``epilogue`` (default): the base GEMM stays on cuBLAS; the LoRA expand adds into its output in
  place, and in backward ``dS·A`` adds into cuBLAS's ``dy·W`` — no separate delta tensor is
  written, re-read and added (a third less LoRA epilogue traffic, no GEMM given up).
- ``gemm`` (or ``1``): LoRAFusion's full fusion, the base GEMM itself runs in the Triton kernel
  whose tiles also accumulate ``scale·S·Bᵀ``; pays only if that GEMM keeps up with cuBLAS on the
  device, which ``bench/bench_lora_kernels.py`` measures.
- ``off`` (or ``0``): base layer, then ``segment_lora``, then an add.

The frozen expert GEMM (``grouped_mm``) has a third backend, ``torch._grouped_mm`` (the library
grouped GEMM). ``LORAFLEET_GROUPED_MM=torch|triton`` forces one; by default (``auto``) it is used on
Hopper-or-newer CUDA devices for bf16/fp16 weights whose shapes it takes, unless
``LORAFLEET_KERNELS`` forces a backend for everything.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .grouped_mm.reference import grouped_mm as _grouped_mm_ref
from .lora_linear.reference import lora_linear as _lora_linear_ref
from .segment_lora.reference import Segment, segment_lora as _segment_lora_ref

__all__ = ["Segment", "segment_lora", "lora_linear", "grouped_mm", "backend", "grouped_backend", "fuse_base"]

ENV = "LORAFLEET_KERNELS"
FUSE_ENV = "LORAFLEET_FUSE_BASE"
GROUPED_ENV = "LORAFLEET_GROUPED_MM"
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


FUSE_MODES = {"": "epilogue", "epilogue": "epilogue", "gemm": "gemm", "1": "gemm", "off": "off", "0": "off"}


def fuse_base() -> str:
    """How layers join their frozen base GEMM and the LoRA: 'epilogue', 'gemm' or 'off'."""
    value = os.environ.get(FUSE_ENV, "epilogue").strip().lower()
    if value not in FUSE_MODES:
        raise ValueError(f"{FUSE_ENV}={value!r}: expected 'epilogue', 'gemm' (1) or 'off' (0)")
    return FUSE_MODES[value]


def segment_lora(x, A, B, segments):
    if backend(A) == "triton":
        from .segment_lora.triton_op import segment_lora as _tri

        return _tri(x, A, B, segments)
    return _segment_lora_ref(x, A, B, segments)


def lora_linear(x, W, bias, A, B, segments, mode="epilogue"):
    """Frozen ``x @ W.T + bias`` plus segmented LoRA; on the Triton backend fused as ``mode``
    says ('epilogue': cuBLAS base, LoRA added in place; 'gemm': one Triton pass)."""
    if backend(A) == "triton":
        from .lora_linear.triton_op import lora_linear as _tri

        return _tri(x, W, bias, A, B, segments, mode)
    return _lora_linear_ref(x, W, bias, A, B, segments)


def grouped_backend(x, W, offsets, transposed=False) -> str:
    """'torch', 'triton' or 'reference' for the frozen expert GEMM (see the module docstring)."""
    choice = os.environ.get(GROUPED_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{GROUPED_ENV}={choice!r}: expected 'torch', 'triton' or 'auto'")
    if choice == "torch":
        return "torch"
    kernels = backend(W)
    if choice == "auto" and kernels == "triton" and x.device.type == "cuda" and W.dtype != torch.float32 \
            and os.environ.get(ENV, "auto").strip().lower() in ("", "auto") \
            and torch.cuda.get_device_capability(x.device) >= (9, 0):
        from .grouped_mm.torch_op import unsupported

        if unsupported(x, W, [int(o) for o in offsets], transposed) is None:
            return "torch"
    return kernels


def grouped_mm(x, W, offsets, transposed=False):
    which = grouped_backend(x, W, offsets, transposed)
    if which == "torch":
        from .grouped_mm.torch_op import grouped_mm as _torch

        return _torch(x, W, offsets, transposed)
    if which == "triton":
        from .grouped_mm.triton_op import grouped_mm as _tri

        return _tri(x, W, offsets, transposed)
    return _grouped_mm_ref(x, W, offsets, transposed)
