"""Static resources of every segment-kernel launch on an H100 (sm_90), without a GPU.

Runs one of each launch the layers make (in Triton's interpreter, on CPU), compiles each distinct
launch for compute capability 9.0 with a GPU run's flags, and prints per launch: shared memory,
registers and spill bytes per thread (``ptxas -v``), and whether the products use Hopper's wgmma
or the older mma.sync. A profile-free first look (see the device tool's METHOD.md, "Read what
costs no device time"): spills or a missing wgmma show up here before any GPU time is spent.

    python bench/kernel_resources.py
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: record the launches on CPU
os.environ["LORAFLEET_KERNELS"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from lorafleet.kernels.segment_lora import aot  # noqa: E402

FIELDS = ("G_COL", "K_IS_RANK", "N_IS_RANK", "ACCUMULATE", "BASE", "BM", "BN", "BK", "BI", "BJ")
ROLE = {  # segment_mm flags -> what the launch computes
    (2, False, True, False): "shrink S = x·Aᵀ",
    (3, True, False, False): "expand y = s·S·Bᵀ",
    (3, False, True, False): "dS = s·dy·B",
    (2, True, False, False): "dX = dS·A",
    (3, True, False, True): "fused y = x·Wᵀ + s·S·Bᵀ",
    (2, True, False, True): "fused dX = dy·W + dS·A",
    (2, False, False, False): "grouped GEMM",
}


def role(name, consts):
    if name == "group_outer":
        return "dA / dB / dW (Σ Pᵀ·Q)"
    what = ROLE.get((consts["G_COL"], consts["K_IS_RANK"], consts["N_IS_RANK"], consts["BASE"]), "?")
    return what.replace(" = ", " += ", 1) if consts["ACCUMULATE"] else what  # epilogue: into cuBLAS's output


def main():
    with aot.record_launches() as recs:
        aot.run_sample_ops()
    print(f"{'kernel':12} {'dtype':8} {'what':26} {'blocks':24} {'smem KiB':>8} {'regs':>5} {'spill B':>7} "
          f"{'mma':8} pipelined")
    for launch in aot.launches(recs):
        out = launch.compile()
        rep = aot.ptxas_report(out)
        ptx, meta = out.asm["ptx"], launch.meta
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
        piped = "yes" if "async_copy_global_to_local" in out.asm["ttgir"] or "async_tma" in out.asm["ttgir"] else "no"
        blocks = " ".join(f"{k}={meta[k]}" for k in ("BM", "BN", "BK", "BI", "BJ") if k in meta)
        print(f"{launch.name:12} {str(launch.dtype).removeprefix('torch.'):8} {role(launch.name, meta):26} "
              f"{blocks:24} {out.metadata.shared / 1024:8.1f} {rep['registers']:5d} {rep['spill_bytes']:7d} "
              f"{mma:8} {piped}")


if __name__ == "__main__":
    main()
