"""Kernel benchmark: one frozen linear layer of the Qwen3-8B shape, alone and with lorafleet LoRA.

For each shape (in -> out: 4096->4096 q/o, 4096->1024 k/v, 4096->12288 gate/up, 12288->4096 down)
and ``--tokens`` T = 8192 tokens, every row times forward + backward (``y.backward(dy)``):

  base            ``F.linear(x, W)`` with W frozen: the input gradient only (what a LoRA step pays
                  for the base layer) -- the reference every other row is compared to
  lora1/<be>      base + ``dispatch.segment_lora(x, A, B, segments)``, 1 adapter owning all T
                  tokens; A/B are the 16-slot bank (``[16, r, in]`` / ``[16, out, r]``, r = 16)
                  and get gradients, as in a training step
  lora16/<be>     the same with 16 adapters, T/16 tokens each (16 segments)
  epi1/<be>, epi16/<be>     ``dispatch.lora_linear(..., mode="epilogue")``: cuBLAS base, the LoRA
                  added into its output (and into its dX) in place -- the layers' default on Triton
  gemm1/<be>, gemm16/<be>   ``dispatch.lora_linear(..., mode="gemm")``: LoRAFusion's one Triton pass
                  for base GEMM + LoRA (``LORAFLEET_FUSE_BASE=gemm``); on ``reference`` both
                  fused kinds are the plain composition (base, delta, add)

``<be>`` is the backend, forced per row through ``LORAFLEET_KERNELS`` (read on every call):
``reference`` (plain torch) and, on CUDA, ``triton``. Reported per shape: the LoRA rows' extra time
as a fraction of the base layer's fwd+bwd, and 16 adapters vs 1. "MFU" counts only the base
layer's 4 * in * out * T FLOPs (forward + input gradient). A benchmark measures; it asserts nothing.

    PYTHONPATH=src python bench/bench_lora_kernels.py                 # H100: bf16, T = 8192
    PYTHONPATH=src python bench/bench_lora_kernels.py --backends triton --json out/kernels.json
    PYTHONPATH=src python bench/bench_lora_kernels.py --tiny          # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpu_common as G  # noqa: E402

REAL_SHAPES = [(4096, 4096), (4096, 1024), (4096, 12288), (12288, 4096)]
TINY_SHAPES = [(64, 64), (64, 16), (64, 192), (192, 64)]
ENV = "LORAFLEET_KERNELS"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    G.add_common_args(p)
    p.add_argument("--tokens", type=int, default=None, help="T tokens through the layer (default 8192, tiny 256)")
    p.add_argument("--shapes", default=None, help="comma list of INxOUT (default the four 8B shapes)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--adapters", type=int, default=16, help="adapters (= slots, = segments) of the lora16 rows")
    p.add_argument("--backends", default=None,
                   help="comma list of reference,triton (default: both on CUDA, reference on CPU)")
    args = p.parse_args(argv)
    G.finish_common_args(args, iters=20, warmup=5)
    args.tokens = args.tokens or (256 if args.tiny else 8192)
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        args.shapes = TINY_SHAPES if args.tiny else REAL_SHAPES
    if args.tokens % args.adapters:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --adapters ({args.adapters})")
    default = "reference,triton" if args.device.type == "cuda" else "reference"
    args.backends = [s.strip() for s in (args.backends or default).split(",") if s.strip()]
    return args


def backend_usable(be, device) -> str | None:
    """None if the backend can run here, else why not."""
    from lorafleet.kernels import dispatch

    if be == "triton":
        if not dispatch.triton_available():
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "triton runs on CUDA only (or TRITON_INTERPRET=1)"
    elif be != "reference":
        return f"unknown backend {be!r}"
    return None


def run_shape(b, args, d_in, d_out):
    from lorafleet.kernels import dispatch
    from lorafleet.kernels.dispatch import Segment

    dev, dt, T, S, r = args.device, args.dtype, args.tokens, args.adapters, args.rank
    g = torch.Generator(device=dev).manual_seed(args.seed + d_in * 7 + d_out)
    x = torch.randn(T, d_in, device=dev, dtype=dt, generator=g).requires_grad_()
    W = (torch.randn(d_out, d_in, device=dev, dtype=dt, generator=g) * 0.02)
    dy = torch.randn(T, d_out, device=dev, dtype=dt, generator=g)
    A = (torch.randn(S, r, d_in, device=dev, dtype=dt, generator=g) * d_in ** -0.5).requires_grad_()
    Bf = (torch.randn(S, d_out, r, device=dev, dtype=dt, generator=g) * 0.01).requires_grad_()
    scale = args.alpha / r
    segs = {1: [Segment(0, T, 0, 0, r, scale)],
            S: [Segment(i * T // S, (i + 1) * T // S, i, i, r, scale) for i in range(S)]}
    params = [x, A, Bf]
    zero = lambda: G.zero_grads(params)  # noqa: E731
    flops = 4 * d_in * d_out * T
    shape = f"{d_in}x{d_out}"

    def base():
        F.linear(x, W).backward(dy)

    def lora(n):
        def step():
            (F.linear(x, W) + dispatch.segment_lora(x, A, Bf, segs[n])).backward(dy)
        return step

    def fused(n, mode):
        def step():
            dispatch.lora_linear(x, W, None, A, Bf, segs[n], mode).backward(dy)
        return step

    meta = dict(tokens=T, flops=flops, before=zero, shape=shape)
    b.run(f"{shape}/base", f"{shape} base fwd + input-grad bwd", base, backend="-", adapters=0, **meta)
    for be in args.backends:
        why = backend_usable(be, dev)
        if why:
            print(f"  {shape}: backend {be} skipped: {why}")
            continue
        old = os.environ.get(ENV)
        os.environ[ENV] = be
        try:
            for n in (1, S):
                b.run(f"{shape}/lora{n}/{be}", f"{shape} base + segment_lora, {n} adapter(s), {be}", lora(n),
                      backend=be, adapters=n, **meta)
            for kind, mode in (("epi", "epilogue"), ("gemm", "gemm")):
                for n in (1, S):
                    b.run(f"{shape}/{kind}{n}/{be}", f"{shape} lora_linear {mode}, {n} adapter(s), {be}",
                          fused(n, mode), backend=be, adapters=n, **meta)
        finally:
            if old is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = old


def report(b, args):
    S = args.adapters
    print(f"LoRA cost per shape and backend: extra time over the base layer's fwd+bwd with 1 and {S} adapters, "
          f"and {S} adapters vs 1 (time):")
    for d_in, d_out in args.shapes:
        shape = f"{d_in}x{d_out}"
        base = b.ok(f"{shape}/base")
        for be in args.backends:
            for kind in ("lora", "epi", "gemm"):
                k1, kS = f"{shape}/{kind}1/{be}", f"{shape}/{kind}{S}/{be}"
                if not any(r["key"] in (k1, kS) for r in b.rows):
                    continue  # backend skipped
                r1, rS, needs = b.ok(k1), b.ok(kS), (f"{shape}/base", k1, kS)
                c1 = b.ratio(f"{k1}/cost", f"{shape} {kind} {be}: 1 adapter, extra over base",
                             r1["median_s"] / base["median_s"] - 1 if r1 and base else None, fmt="{:+.1%}",
                             needs=needs, show=False)
                cS = b.ratio(f"{kS}/cost", f"{shape} {kind} {be}: {S} adapters, extra over base",
                             rS["median_s"] / base["median_s"] - 1 if rS and base else None, fmt="{:+.1%}",
                             needs=needs, show=False)
                vs = b.ratio(f"{shape}/{kind}/{be}/{S}_vs_1", f"{shape} {kind} {be}: {S} adapters vs 1, time",
                             rS["median_s"] / r1["median_s"] if r1 and rS else None, needs=needs, show=False)
                print(f"  {shape:<11}{kind:<6}{be:<10} 1 adapter {c1:>8}   {S} adapters {cS:>8}   "
                      f"{S} vs 1 {vs:>7}")


def main(argv=None):
    args = parse_args(argv)
    cfg = {
        "layers": ", ".join(f"{i}->{o}" for i, o in args.shapes) + f"; T={args.tokens} tokens",
        "LoRA": f"r={args.rank}, scale {args.alpha / args.rank:g}, bank of {args.adapters} slots; 1 or "
                f"{args.adapters} adapters (segments of {args.tokens // args.adapters} tokens)",
        "backends": ", ".join(args.backends),
    }
    b = G.Bench("lorafleet kernel benchmark: single linear layers (Qwen3-8B shapes)", args, cfg)
    for d_in, d_out in args.shapes:
        shape = f"{d_in}x{d_out}"
        b.system(shape, [(f"{shape}/base", f"{shape} base")], run_shape, b, args, d_in, d_out)
    b.table()
    report(b, args)
    return b.finish()


if __name__ == "__main__":
    main()
