"""Rollout throughput: vLLM (the ``vllm-local`` sink) vs lorafleet's built-in sampler, side by side.

Same base (a dense debug Qwen3 saved as a Hugging Face directory, or ``--base DIR``), same
adapter (trained a few steps so it is not zero), same prompts, same sampling parameters
(``stop_on_eos`` off, so every sample is exactly ``--max-tokens`` long), both warmed up once.
Also the cost of one push: ``Fleet.snapshot`` (ms), the push itself (write + ``load_lora_adapter``
in place, ms) and its size (bytes). vLLM runs in its own processes beside this one, so on a small
machine both compete for the same cores: the numbers are a ratio on this machine, not a ranking.

    .venv/bin/python bench/bench_rollout.py [--prompts 16] [--n 4] [--max-tokens 32] [--url URL]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafleet import AdapterConfig, Example, Fleet, OptimConfig
from lorafleet.engine.sampling import SampleRequest, SamplingParams


def build_base(out: Path, arch: str):
    """A debug base saved for vLLM (as `lorafleet rl` saves one for vllm-local)."""
    from lorafleet.data.tokenizer import save_tokenizer
    from lorafleet.jobs.base_model import load_base
    from lorafleet.jobs.config import BaseSpec

    # head_dim 32: vLLM's CPU attention takes 32, 64, 80, ... (the debug models' 16 is refused)
    model, tok, _ = load_base(BaseSpec(debug=arch, overrides={"head_dim": 32}), log=lambda *a: None)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return model, tok


def trained_fleet(model, tok, rank: int) -> Fleet:
    fleet = Fleet(model, max_adapters=2, max_rank=rank)
    fleet.tokenizer = tok
    fleet.add_adapter("a", AdapterConfig(rank=rank, alpha=2 * rank, target_modules="all-linear", seed=0))
    fleet.set_optimizer("a", OptimConfig(lr=1e-2))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(3, model.config.vocab_size, (4, 17), generator=g).tolist()
        fleet.forward_backward([Example("a", r[:-1], r[1:]) for r in ids], loss_fn="cross_entropy")
        fleet.optim_step()
    return fleet


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="a Hugging Face model directory (default: a debug Qwen3 saved in a temp dir)")
    ap.add_argument("--arch", default="qwen3", help="debug arch when --base is not given (dense: vLLM CPU LoRA)")
    ap.add_argument("--url", help="a running vLLM (same base, --enable-lora); default: start vllm-local")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from lorafleet.rollout import make_engine

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    if args.base:
        from transformers import AutoModelForCausalLM

        from lorafleet.data.tokenizer import load_tokenizer

        base_dir = Path(args.base)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tok = load_tokenizer(base_dir)
    else:
        base_dir = tmp / "base"
        model, tok = build_base(base_dir, args.arch)
    fleet = trained_fleet(model, tok, args.rank)
    spec = ({"engine": "vllm", "url": args.url, "max_lora_rank": args.rank} if args.url else
            {"engine": "vllm-local", "max_lora_rank": args.rank, "max_loras": 2, "dtype": "float32"})
    t0 = time.perf_counter()
    engine = make_engine({**spec, "adapter_dir": str(tmp / "adapters")}, base_dir=str(base_dir), max_rank=args.rank)
    start_s = time.perf_counter() - t0
    try:
        # one push: snapshot, then write + load in place (the first push loads; later ones replace)
        snaps, snap_s = timed(lambda: fleet.snapshot("a"), args.repeats)
        name = engine.push(snaps)
        _, push_s = timed(lambda: engine.push(fleet.snapshot("a")), args.repeats)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_tokens), generator=g).tolist()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=5, stop_on_eos=False)
        reqs = [SampleRequest("a", p, args.n) for p in prompts]

        def builtin():
            with torch.no_grad():
                return fleet.sample(reqs, params)

        builtin()
        engine.generate(name, prompts, params, args.n)  # warm-up
        ours, ours_s = timed(builtin, args.repeats)
        theirs, theirs_s = timed(lambda: engine.generate(name, prompts, params, args.n), args.repeats)
        greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_on_eos=False)
        same = sum(a[0].tokens == b[0].tokens for a, b in zip(fleet.sample(reqs[:4], greedy),
                                                               engine.generate(name, prompts[:4], greedy, 1)))
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)
    n_ours = sum(len(s.tokens) for g_ in ours for s in g_)
    n_theirs = sum(len(s.tokens) for g_ in theirs for s in g_)
    print(f"base {base_dir} ({args.arch if not args.base else 'given'}), adapter rank {args.rank}, "
          f"{args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens, temperature 1; "
          f"torch threads here {torch.get_num_threads()}; vLLM started in {start_s:.1f} s")
    print(f"{'':28s}{'built-in':>12s}{'vLLM':>12s}{'vLLM/built-in':>15s}")
    print(f"{'rollout tokens/s':28s}{n_ours / ours_s:12.0f}{n_theirs / theirs_s:12.0f}"
          f"{(n_theirs / theirs_s) / (n_ours / ours_s):15.2f}")
    print(f"{'rollout wall s (median)':28s}{ours_s:12.3f}{theirs_s:12.3f}{theirs_s / ours_s:15.2f}")
    print(f"push: Fleet.snapshot {snap_s * 1e3:.1f} ms, push (write + load in place) {push_s * 1e3:.1f} ms, "
          f"{snaps.nbytes} bytes ({len(snaps.tensors)} tensors)")
    print(f"greedy check: {same} of 4 prompts give identical tokens in both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
