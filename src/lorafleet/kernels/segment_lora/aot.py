"""Ahead-of-time compilation of the segment kernels for a GPU that is not here.

Triton's CUDA backend (its bundled ``ptxas`` included) compiles for any compute capability without
a device, so the launches the ops actually make can be checked for the real chip on a CPU-only
machine: that they compile, fit shared memory, use the tensor-core instructions meant, and how
many registers they take (``ptxas -v``). ``record_launches`` runs the ops (in the interpreter, on
CPU tensors) with every kernel launch recorded; ``launches`` turns the records into distinct
``Launch``es that compile as the GPU's launcher would specialize them (Triton's own binder).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from .. import dispatch
from ..dispatch import Segment
from . import triton_kernels as K

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes per block, the opt-in maximum on sm_90
KERNELS = {"segment_mm": "_segment_mm_kernel", "group_outer": "_group_outer_kernel"}


class Recorder:
    """Stands in for a kernel: records each launch's arguments, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((args, meta))
            return self.kernel[grid](*args, **meta)
        return launch


@contextlib.contextmanager
def record_launches():
    """Within the block, the segment kernels record their launches: yields {name: Recorder}."""
    recs = {name: Recorder(getattr(K, attr)) for name, attr in KERNELS.items()}
    try:
        for name, attr in KERNELS.items():
            setattr(K, attr, recs[name])
        yield recs
    finally:
        for name, attr in KERNELS.items():
            setattr(K, attr, recs[name].kernel)


@dataclass
class Launch:
    """One recorded launch, re-compilable for a target exactly as Triton's launcher would
    specialize it there (strides equal to 1 become constants, 16-divisible values and pointers
    get divisibility hints: what lets the compiler vectorize loads and pipeline them)."""

    name: str
    kernel: JITFunction
    args: tuple
    meta: dict
    dtype: torch.dtype

    def specialize(self, target=H100, num_warps=4, num_stages=3, **overrides):
        backend = CUDABackend(target)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        # a GPU run's flags: no interpreter-only bf16 widening, tensor cores for 16-bit inputs
        meta = dict(self.meta, UPCAST=False, PREC="ieee" if self.dtype == torch.float32 else "tf32")
        meta.update(overrides)
        opts = dict(num_warps=num_warps, num_stages=num_stages)
        bound, spec, options = binder(*self.args, **meta, **opts)
        _, signature, constexprs, attrs = self.kernel._pack_args(backend, {**meta, **opts}, bound, spec, options)
        return signature, constexprs, attrs, meta

    def compile(self, target=H100, num_warps=4, num_stages=3, **overrides):
        signature, constexprs, attrs, _ = self.specialize(target, num_warps, num_stages, **overrides)
        src = ASTSource(self.kernel, signature, constexprs, attrs)
        return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def launches(recs: dict) -> list[Launch]:
    """The distinct recorded launches (distinct as the target would specialize them)."""
    seen = {}
    for name, rec in recs.items():
        kernel = JITFunction(rec.kernel.fn)
        for args, meta in rec.launches:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            launch = Launch(name, kernel, args, meta, dtype)
            signature, constexprs, attrs, _ = launch.specialize()
            key = (name, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
            seen.setdefault(key, launch)
    return list(seen.values())


def ptxas_report(compiled, arch: str = "sm_90a") -> dict:
    """Registers and spill bytes per thread, from ``ptxas -v`` on the compiled PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(map(int, spills))}


def run_sample_ops():
    """One of each launch the layers make: segment_lora, the fused lora_linear and grouped_mm,
    forward and backward, fp32 and bf16 (small odd shapes: every launch site and flag
    combination, not every size). Needs the Triton backend (on CPU: ``TRITON_INTERPRET=1``)."""
    g = torch.Generator().manual_seed(0)
    segs = [Segment(0, 40, 0, 0, 16, 2.0), Segment(40, 70, 1, 1, 8, 0.5)]
    for dtype in (torch.float32, torch.bfloat16):
        r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
        x, A, B = r(70, 48), r(2, 16, 48), r(2, 32, 16)  # feature dims of models are 16-divisible
        dispatch.segment_lora(x, A, B, segs).sum().backward()
        W, bias = torch.randn(32, 48, generator=g).to(dtype), torch.randn(32, generator=g).to(dtype)
        for mode in ("epilogue", "gemm"):
            dispatch.lora_linear(x, W, bias, A, B, segs, mode).sum().backward()
        dispatch.grouped_mm(x, r(3, 32, 48), [0, 30, 30, 70]).sum().backward()
