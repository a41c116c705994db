"""Shared harness of the GPU benchmarks (bench_gpu_dense.py, bench_gpu_moe.py, bench_lora_kernels.py).

Not a package module: each script puts its own folder on ``sys.path`` and imports this file.

- Timing: ``--warmup`` untimed steps, then the median of ``--iters`` timed steps; on CUDA every
  timed region is bracketed by ``torch.cuda.synchronize()``; the clock is ``time.perf_counter``.
  A row's untimed ``before`` hook (zeroing gradients) runs before every step.
- Peak memory: ``torch.cuda.max_memory_allocated`` over a row's timed steps (the peak is reset
  after its warm-up; weights and anything else resident count); "-" on CPU.
- MFU: ``flops / step time / peak`` with each script's FLOP basis (stated in its docstring);
  peak = ``--peak-tflops`` (default 989, H100 SXM dense bf16; "-" on CPU unless given).
- Errors: outside ``--tiny``/``--strict`` a failing row (or the build of a system) is printed in the
  table (``OOM`` or the exception) and the run goes on; with ``--tiny`` exceptions propagate.
- ``--json PATH`` writes the environment, arguments, rows and ratios.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import torch

H100_BF16_PEAK_TFLOPS = 989.0
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ arguments
def add_common_args(p):
    p.add_argument("--tiny", action="store_true",
                   help="toy shapes, CPU fp32, 2 iterations: a smoke run of every code path in seconds")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per row, median reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak for MFU (default {H100_BF16_PEAK_TFLOPS:g} on cuda: H100 SXM dense bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 1 on CPU with --tiny)")
    p.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"],
                   help="set LORAFLEET_KERNELS for the whole run (default: leave the environment alone)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every result to PATH as JSON")
    p.add_argument("--strict", action="store_true", help="let a failing row raise (always on with --tiny)")
    p.add_argument("--seed", type=int, default=0)


def add_model_args(p, real: dict, tiny: dict):
    """One ``--<dim>`` option per model dimension (defaults: ``real``, or ``tiny`` with --tiny),
    and the LoRA / loss options the two model benchmarks share."""
    for k in real:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {real[k]} (tiny {tiny[k]})")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--chunk", type=int, default=1024, help="rows of logits per chunk of the LM-head loss")
    p.add_argument("--peft-fp32-adapters", action="store_true",
                   help="PEFT's default autocast_adapter_dtype=True (fp32 LoRA on a bf16 base)")


def finish_model_args(args, real: dict, tiny: dict):
    for k in real:
        if getattr(args, k) is None:
            setattr(args, k, (tiny if args.tiny else real)[k])


def finish_common_args(args, iters=10, warmup=3):
    """Fill the device/dtype/iteration defaults that depend on ``--tiny``."""
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    args.dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    args.iters = args.iters if args.iters is not None else (2 if args.tiny else iters)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else warmup)
    args.strict = bool(args.strict or args.tiny)
    if args.peak_tflops is None and args.device.type == "cuda":
        args.peak_tflops = H100_BF16_PEAK_TFLOPS
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.tiny and args.device.type == "cpu":
        torch.set_num_threads(1)
    if args.kernels:
        os.environ["LORAFLEET_KERNELS"] = args.kernels
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: pass --device cpu (and --tiny for toy shapes)")
    return args


# ----------------------------------------------------------------------- device helpers
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def free(device, always=False):
    """Drop dead objects and CUDA's cached blocks (on CPU only when ``always``: a full collection
    of a heap holding transformers and peft costs ~0.1 s, too much per row of a --tiny run)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    elif always:
        gc.collect()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, OOM_ERRORS) or "out of memory" in str(e).lower()


def describe_error(e: BaseException) -> str:
    return "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:100]


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def environment(device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = (f"{props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
               f"CUDA {torch.version.cuda})")
    else:
        dev = f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "-"
    except Exception:
        commit = "-"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "device": dev, "device_type": device.type, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
            "triton": _version("triton"), "lorafleet": _version("lorafleet"), "git": commit,
            "LORAFLEET_KERNELS": os.environ.get("LORAFLEET_KERNELS", "auto (unset)"),
            "lorafleet_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORAFLEET_")}}


# --------------------------------------------------------------------------- model helpers
def build_causal_lm(config, device, dtype, seed, std=0.02):
    """Random-init causal LM built directly on ``device`` in ``dtype`` (transformers' own init is
    skipped; matrices ~ N(0, std), norm weights 1, biases 0), frozen, eval mode. Same seed and
    device -> same weights, so each system can get a fresh, identical base."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = nullcontext
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if any(p.device.type != torch.device(device).type for p in model.parameters()):
        model.to(device)  # the device context did not take (it does with transformers 5.17)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.requires_grad_(False)
    model.eval()
    return model


def chunked_loss(hidden, lm_head_weight, targets, chunk=1024):
    """-sum(logprob of targets) through lorafleet's chunked LM head (engine/logprobs.py): logits
    exist ``chunk`` rows at a time, in fp32 -- the same loss path the Fleet uses. Calls the autograd
    function itself when it can: ``token_logprobs``'s range check of the targets syncs the GPU, which
    would cost the time-multiplexed PEFT row one sync per adapter that PEFT itself never pays."""
    from lorafleet.engine import logprobs

    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    fn = getattr(logprobs, "_ChunkedLogprobs", None)
    lp, _ = fn.apply(h, lm_head_weight, None, None, t, chunk) if fn is not None else logprobs.token_logprobs(
        h, lm_head_weight, t, chunk)
    return -lp.sum()


@torch.no_grad()
def randomize_lora_B(named_params, names, std, seed, device):
    """LoRA B starts at zero; give every B (parameter name ending in one of ``names``) N(0, std)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = 0
    for name, p in named_params:
        if any(name.endswith(s) for s in names):
            p.normal_(0.0, std, generator=gen)
            n += 1
    assert n, f"no parameter ends with any of {names}"
    return n


def zero_grads(params):
    for p in params:
        p.grad = None


# ------------------------------------------------------------------------------- the bench
class Bench:
    """Collects rows and ratios; prints the header, the table and the ratio lines."""

    def __init__(self, title: str, args, config: dict):
        self.title, self.args, self.config = title, args, config
        self.rows: list[dict] = []
        self.ratios: list[dict] = []
        self.env = environment(args.device)
        self.t0 = time.perf_counter()
        e = self.env
        print(f"== {title} ==")
        print(f"date {e['date']}  host {e['host']}  git {e['git']}")
        print(f"device {e['device']}")
        print(f"torch {e['torch']}  transformers {e['transformers']}  peft {e['peft']}  triton {e['triton']}  "
              f"lorafleet {e['lorafleet']}  python {e['python']}")
        others = {k: v for k, v in e["lorafleet_env"].items() if k != "LORAFLEET_KERNELS"}
        print(f"LORAFLEET_KERNELS={e['LORAFLEET_KERNELS']}" + "".join(f"  {k}={v}" for k, v in others.items()))
        peak = f"{args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "- (CPU; pass --peak-tflops)"
        print(f"dtype {str(args.dtype).removeprefix('torch.')}  warmup {args.warmup}  iters {args.iters} (median)  "
              f"MFU peak {peak}{'  [--tiny: toy shapes, says nothing about GPU speed]' if args.tiny else ''}")
        for k, v in config.items():
            print(f"  {k}: {v}")
        sys.stdout.flush()

    # -------------------------------------------------------------- running
    def run(self, key, label, step, *, tokens, flops=None, before=None, iters=None, warmup=None, **meta):
        """Time ``step`` (returns a loss or None); record a row. Failures become the row's error
        (re-raised with --strict / --tiny)."""
        a, dev = self.args, self.args.device
        iters = a.iters if iters is None else iters
        warmup = a.warmup if warmup is None else warmup
        row = {"key": key, "label": label, "tokens": tokens, "flops": flops, **meta}
        print(f"  running {key}: {label} ...", end="", flush=True)
        try:
            free(dev)
            out = None
            for _ in range(warmup):
                if before:
                    before()
                out = step()
            sync(dev)
            reset_peak(dev)  # after the warm-up: Triton autotuning's trial buffers are not the row's
            times = []
            for _ in range(iters):
                if before:
                    before()
                sync(dev)
                t0 = time.perf_counter()
                out = step()
                sync(dev)
                times.append(time.perf_counter() - t0)
            loss = float(out) if out is not None else None
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(f"{key}: non-finite loss {loss}")
            med = statistics.median(times)
            row.update(times_s=times, median_s=med, min_s=min(times), tokens_per_s=tokens / med,
                       peak_mem_gib=peak_gib(dev), loss=loss, error=None)
            if flops and a.peak_tflops:
                row["mfu"] = flops / med / (a.peak_tflops * 1e12)
            print(f" {med * 1e3:.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a benchmark reports failures and goes on
            if a.strict:
                print(" FAILED", flush=True)
                raise
            row["error"] = describe_error(e)
            print(f" {row['error']}", flush=True)
            if not is_oom(e):
                traceback.print_exc(file=sys.stderr)
        free(dev)
        self.rows.append(row)
        return row

    def system(self, name, keys_labels, fn, *a, **kw):
        """Run ``fn`` (builds a system and runs its rows); if it raises, the rows it did not get to
        are recorded with the error. Locals of ``fn`` (models) are freed when it returns."""
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001
            if self.args.strict:
                raise
            err = describe_error(e)
            print(f"  system {name!r} failed: {err}", flush=True)
            if not is_oom(e):
                traceback.print_exc(file=sys.stderr)
            done = {r["key"] for r in self.rows}
            for key, label in keys_labels:
                if key not in done:
                    self.rows.append({"key": key, "label": label, "error": f"{name}: {err}"})
        free(self.args.device, always=True)

    def ok(self, key):
        r = next((r for r in self.rows if r["key"] == key), None)
        return r if r is not None and not r.get("error") else None

    # -------------------------------------------------------------- ratios
    def ratio(self, key, text, value, *, target=None, fmt="{:.2f}x", needs=(), na=None, show=True):
        """Record (and print, with ``show``) one ratio; returns the shown value. ``target``:
        (op, threshold) with op '>=', '<=' or '<'; ``value`` None shows n/a with ``na`` or the
        missing rows among ``needs``."""
        met = None
        if value is None:
            missing = [k for k in needs if self.ok(k) is None]
            shown = f"n/a ({na or 'missing/failed rows: ' + (', '.join(missing) or '?')})"
        else:
            shown = fmt.format(value)
            if target:
                op, thr = target
                met = {">=": value >= thr, "<=": value <= thr, "<": value < thr}[op]
        tgt = ""
        if target:
            op, thr = target
            verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
            tgt = f"   [target {op} {fmt.format(thr)}: {verdict}]"
        if show:
            print(f"  {text}: {shown}{tgt}")
        self.ratios.append({"key": key, "text": text, "value": value, "target": list(target) if target else None,
                            "met": met})
        return shown + tgt

    # -------------------------------------------------------------- output
    def table(self):
        kw = max([len(r["key"]) for r in self.rows] + [3]) + 2
        lw = max([len(r["label"]) for r in self.rows] + [3]) + 2
        print()
        hdr = f"{'key':<{kw}}{'row':<{lw}}{'ms/step':>10}{'min':>10}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}  note"
        print(hdr)
        print("-" * len(hdr))
        for r in self.rows:
            lead = f"{r['key']:<{kw}}{r['label']:<{lw}}"
            if r.get("error"):
                print(f"{lead}{'FAILED':>10}{'':>10}{'':>12}{'':>8}{'':>10}  {r['error']}")
                continue
            mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
            note = r.get("note", "")
            if r.get("loss") is not None:
                note = f"loss/token {r['loss'] / r['tokens']:.3f}" + (f"; {note}" if note else "")
            print(f"{lead}{r['median_s'] * 1e3:>10.2f}{r['min_s'] * 1e3:>10.2f}{r['tokens_per_s']:>12.0f}{mfu:>8}"
                  f"{mem:>10}  {note}")
        print()

    def finish(self):
        targets = [r for r in self.ratios if r["target"]]
        met = sum(1 for r in targets if r["met"])
        failed = [r["key"] for r in self.rows if r.get("error")]
        print((f"targets met: {met}/{len(targets)}" if targets else "targets: none in this benchmark")
              + (f"; failed rows: {', '.join(failed)}" if failed else "")
              + f"; total wall {time.perf_counter() - self.t0:.1f} s")
        result = {"title": self.title, "env": self.env, "config": self.config,
                  "args": {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                           for k, v in vars(self.args).items()},
                  "rows": self.rows, "ratios": self.ratios}
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(result, indent=2, default=str))
            print(f"wrote {self.args.json}")
        return result
