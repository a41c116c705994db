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

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lorafleet.kernels.segment_lora import triton_kernels as K, tuning  # noqa: E402

if not isinstance(K._segment_mm_kernel, InterpretedFunction):
    importlib.reload(K)

from lorafleet.kernels.segment_lora import aot  # noqa: E402


def _record(monkeypatch):
    monkeypatch.setenv("LORAFLEET_KERNELS", "triton")
    with aot.record_launches() as recs:
        aot.run_sample_ops()
    assert not isinstance(K._segment_mm_kernel, aot.Recorder)  # the real kernels are back
    return aot.launches(recs)


def test_every_launch_compiles_for_h100(monkeypatch):
    launches = _record(monkeypatch)
    assert {launch.name for launch in launches} == {"segment_mm", "group_outer"}
    assert len(launches) >= 12, len(launches)  # shrink, expand, dS, dX, fused, grouped, outer × 2 dtypes
    for launch in launches:
        out = launch.compile()
        ptx, ttgir, meta = out.asm["ptx"], out.asm["ttgir"], launch.meta
        assert out.asm["cubin"] and out.metadata.shared <= aot.SMEM_LIMIT, (launch.name, meta, out.metadata.shared)
        if launch.dtype == torch.bfloat16:  # 16-bit products reach the tensor cores
            assert "wgmma" in ptx or "mma.sync" in ptx, (launch.name, meta)
            if meta.get("BASE"):  # the fused base GEMM: Hopper's wgmma, fed by pipelined async copies
                assert "wgmma" in ptx and "async_copy_global_to_local" in ttgir, meta


@pytest.mark.slow
def test_autotune_candidates_compile_for_h100(monkeypatch):
    """Every autotuning candidate of the fused bf16 forward compiles for sm_90 and uses wgmma;
    at least half of them fit in shared memory (the autotuner skips the others)."""
    fused = next(la for la in _record(monkeypatch) if la.meta.get("BASE") and la.dtype == torch.bfloat16)
    shapes = {"K": 16, "NOUT": 4096, "KB": 4096}  # a 4096 → 4096 layer at rank 16
    fits = []
    for c in tuning.prune_segment_mm(tuning._configs(tuning.SEGMENT_MM_CANDIDATES, ("BN", "BK")), shapes):
        out = fused.compile(num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs)
        fits.append(out.metadata.shared <= aot.SMEM_LIMIT)
        assert "wgmma" in out.asm["ptx"], c
    assert sum(fits) >= len(fits) / 2, fits
