"""Every kernel launch the ops make, compiled ahead of time for an H100 (sm_90) — no GPU needed.

The interpreter checks the kernels' arithmetic; it does not check that they compile for the real
chip, fit its shared memory, or reach its tensor-core instructions. Here the ops run on CPU under
the interpreter with each launch recorded; every distinct launch (dtypes, flags, block shapes,
warps, stages) is then compiled by Triton's CUDA backend (ptxas included) for compute capability
9.0, with the flags a GPU run would use (no interpreter-only bf16 widening, tensor-core
precision for 16-bit inputs). The slow-marked test compiles every autotuning candidate too.
"""

import importlib
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] in ("", "0") or torch.cuda.is_available():
    pytest.skip("compiles for sm_90 from the interpreter's recorded launches (CPU runs only)",
                allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lorafleet.kernels import dispatch  # noqa: E402
from lorafleet.kernels.dispatch import Segment  # noqa: E402
from lorafleet.kernels.segment_lora import triton_kernels as K, tuning  # noqa: E402

if not isinstance(K._segment_mm_kernel, InterpretedFunction):
    importlib.reload(K)

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # per block, opt-in maximum on sm_90
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}


class Recorder:
    """Stands in for a kernel: records each launch's arguments, then runs the interpreted kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((args, meta))
            return self.kernel[grid](*args, **meta)
        return launch


def _record(monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNELS", "triton")
    recs = {name: Recorder(getattr(K, name)) for name in ("_segment_mm_kernel", "_group_outer_kernel")}
    for name, rec in recs.items():
        monkeypatch.setattr(K, name, rec)
    g = torch.Generator().manual_seed(0)
    segs = [Segment(0, 40, 0, 0, 16, 2.0), Segment(40, 70, 1, 1, 8, 0.5)]
    for dtype in (torch.float32, torch.bfloat16):
        r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
        x, A, B = r(70, 48), r(2, 16, 48), r(2, 40, 16)
        dispatch.segment_lora(x, A, B, segs).sum().backward()
        W, bias = torch.randn(40, 48, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
        dispatch.lora_linear(x, W, bias, A, B, segs).sum().backward()
        Wg = r(3, 24, 48)
        dispatch.grouped_mm(x, Wg, [0, 30, 30, 70]).sum().backward()
    return {name.strip("_").removesuffix("_kernel"): rec for name, rec in recs.items()}


def _variant(kernel: JITFunction, args, meta, num_warps=4, num_stages=3):
    """(signature, constexprs) of a launch, with the flags a GPU run uses."""
    names = kernel.arg_names
    sig, dtype = {}, None
    for name, v in zip(names, args):
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
            dtype = dtype or v.dtype
        else:
            sig[name] = "i32"
    consts = dict(meta, UPCAST=False, PREC="ieee" if dtype == torch.float32 else "tf32")
    sig.update({k: "constexpr" for k in consts})
    key = (tuple(sorted(sig.items())), tuple(sorted(consts.items())), num_warps, num_stages)
    return key, sig, consts


def _compile(kernel: JITFunction, sig, consts, num_warps=4, num_stages=3):
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))


def test_every_launch_compiles_for_h100(monkeypatch):
    recorded = _record(monkeypatch)
    seen = {}
    for name, rec in recorded.items():
        kernel = JITFunction(rec.kernel.fn)
        for args, meta in rec.launches:
            key, sig, consts = _variant(kernel, args, meta)
            seen.setdefault(key, (name, kernel, sig, consts))
    assert {name for name, *_ in seen.values()} == {"segment_mm", "group_outer"}
    assert len(seen) >= 12, len(seen)  # shrink, expand, dS, dX, fused fwd/dX, grouped, outer × 2 dtypes
    for name, kernel, sig, consts in seen.values():
        out = _compile(kernel, sig, consts)
        ptx, bf16 = out.asm["ptx"], sig["X" if name == "segment_mm" else "P"] == "*bf16"
        assert out.asm["cubin"] and out.metadata.shared <= SMEM_LIMIT, (name, consts, out.metadata.shared)
        if bf16:  # 16-bit products must reach the tensor cores (wgmma on Hopper, else mma.sync)
            assert "wgmma" in ptx or "mma.sync" in ptx, (name, consts)
        if bf16 and consts.get("BASE"):  # the fused base GEMM's 64-row tiles: Hopper's wgmma
            assert "wgmma" in ptx, consts


@pytest.mark.slow
def test_autotune_candidates_compile_for_h100():
    """Each pruned candidate of a fused bf16 layer (4096 → 4096, rank 16) and of its dA/dB
    compiles for sm_90; at least the fastest-looking half fit in shared memory."""
    seg = JITFunction(K._segment_mm_kernel.fn)
    shapes = {"K": 16, "NOUT": 4096, "KB": 4096}
    ptrs = {"tiles": "*i32", "segs": "*i32", "scales": "*fp32"} | dict.fromkeys(("X", "M", "Y", "X0", "W0", "bias"), "*bf16")
    sig = {n: ptrs.get(n, "i32") for n in seg.arg_names[: seg.arg_names.index("G_COL")]}
    base = dict(G_COL=3, K_IS_RANK=True, N_IS_RANK=False, USE_SCALE=True, ACCUMULATE=False, BASE=True,
                HAS_BIAS=True, BM=64, PREC="tf32", UPCAST=False)
    fits = []
    for c in tuning.prune_segment_mm(tuning._configs(tuning.SEGMENT_MM_CANDIDATES, ("BN", "BK")), shapes):
        consts = base | c.kwargs
        out = _compile(seg, sig | {k: "constexpr" for k in consts}, consts, c.num_warps, c.num_stages)
        fits.append(out.metadata.shared <= SMEM_LIMIT)
        assert "wgmma" in out.asm["ptx"], c
    assert sum(fits) >= len(fits) / 2, fits
