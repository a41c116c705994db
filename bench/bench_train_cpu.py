"""CPU benchmark: training throughput of K LoRA adapters trained together in one fleet vs the same
K adapters trained one after another with PEFT, on the same data, side by side in one run.

A benchmark measures; nothing here asserts anything about speed. Rows:

  A  lorafleet-together   one ``Fleet(max_adapters=K)``; each step takes every adapter's next batch
                          and runs ONE ``forward_backward`` over all K x batch examples, then one
                          ``optim_step()`` (every adapter's own AdamW)
  B  peft-sequential      per adapter, one after another: a PEFT model (``PeftModel.from_pretrained``
                          on a deepcopy of the base, from lorafleet's exported initial adapter, so
                          both start from identical weights) trained with ``torch.optim.AdamW`` on
                          the same batches: right-padded tensors built from the Examples, forward,
                          loss = -sum(w * logprob(target)) (log_softmax + gather), backward, step
  C  lorafleet-sequential (``--rows`` with ``c``, on by default) the same adapters in a second
                          ``Fleet(max_adapters=K)``, trained one after another (one adapter per
                          ``forward_backward``): separates "batching across adapters" (A vs C)
                          from "lorafleet vs PEFT implementation" (C vs B)

Every adapter gets ``--warmup`` + ``--steps`` optimizer steps in every row, on the same batches;
the first ``--warmup`` steps are untimed (row A: its first steps; rows B and C: each adapter's first
steps, so B and C do not pay a new model's first step either). Tokens = input positions of the
examples processed (padding not counted), identical in every row. Timed work is interleaved so
background load spreads over the rows: A's timed steps are cut into K chunks and slice k runs A's
chunk k, then B's adapter k (all its steps), then C's adapter k, in an order rotated per slice.

Before timing (untimed), the loss of one adapter's first batch is computed by lorafleet and by PEFT
from the same weights (B=0 as initialised, and with every factor nudged so LoRA has an effect);
after timing, each adapter's final loss on its first batch is compared across rows (same start,
same batches, same AdamW: the rows should have trained the same adapters).

    python bench/bench_train_cpu.py               # defaults (~30 s with 1 thread; minutes if a loaded
                                                  # machine stalls torch's 2 threads)
    python bench/bench_train_cpu.py --quick       # smoke run (< 40 s incl. imports)
    python bench/bench_train_cpu.py --threads 1   # steadier numbers on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TASKS = ("rev", "sort", "upper", "rot")
ROW_LABELS = {
    "a": "lorafleet-{k} together",
    "b": "peft-{k} sequential",
    "c": "lorafleet-{k} sequential",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="adapters (each on its own task, cycling %s)" % "/".join(TASKS))
    p.add_argument("--steps", type=int, default=8,
                   help="timed optimizer steps per adapter (default 8, not 20: with torch's default 2 threads on a "
                        "2-core machine shared with other jobs (load 4-6), 20 steps took 8.4 minutes and 12 steps "
                        "6.8; with --threads 1, 20 steps take about 45 s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per adapter before the timed ones")
    p.add_argument("--batch", type=int, default=8, help="examples per adapter per step")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe-inter", type=int, default=64, help="moe_intermediate_size")
    p.add_argument("--vocab", type=int, default=112, help="model vocab (>= the tokenizer's 105 tokens)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice, printed). 1 thread is steadier on a "
                        "machine other processes load")
    p.add_argument("--rows", default="a,b,c", help="comma list of rows to run: a,b,c")
    p.add_argument("--peft-experts-impl", default=None,
                   help="experts_implementation for the PEFT models (default: the debug model's, 'eager')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(REPO / "examples" / "data"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 steps, 1 thread unless --threads: a smoke run (< 40 s)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.experts, args.moe_inter = 64, 2, 4, 32
        args.steps, args.warmup = 3, 1
        if args.threads is None:
            args.threads = 1  # as bench_moe_lora_cpu.py: a smoke run must not stall on a loaded machine
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROW_LABELS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROW_LABELS)}")
    if args.k < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--k, --steps and --batch must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- helpers
def loadavg():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def maxrss_mib():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() == "Linux" else kb / 2**20


def n_tokens(examples):
    return sum(len(e.input_tokens) for e in examples)


def padded_tensors(examples):
    """Right-padded input_ids / attention_mask / targets / weights from Examples (as forward_backward)."""
    lens = [len(e.input_tokens) for e in examples]
    T = max(lens)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    tgt = torch.zeros(len(examples), T, dtype=torch.long)
    w = torch.zeros(len(examples), T, dtype=torch.float32)
    for r, e in enumerate(examples):
        n = lens[r]
        ids[r, :n] = torch.tensor(e.input_tokens)
        mask[r, :n] = 1
        tgt[r, :n] = torch.tensor(e.target_tokens)
        w[r, :n] = torch.tensor(e.weights, dtype=torch.float32)
    return ids, mask, tgt, w


def peft_losses(pm, examples):
    """Per-example loss -sum(w * logprob(target)) of a PEFT model, from its logits."""
    ids, mask, tgt, w = padded_tensors(examples)
    logits = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    lp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt[..., None]).squeeze(-1)
    return -(lp * w).sum(dim=1)  # padding has weight 0


def build_base(args):
    from lorafleet.models.debug import build_debug_model

    return build_debug_model("qwen3_moe", seed=args.seed, vocab_size=args.vocab, hidden_size=args.hidden,
                             num_hidden_layers=args.layers, moe_intermediate_size=args.moe_inter,
                             num_experts=args.experts)


def make_peft(base, adapter_dir, args):
    from peft import PeftModel

    model = copy.deepcopy(base)
    if args.peft_experts_impl:
        model.set_experts_implementation(args.peft_experts_impl)
    pm = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    # weight_decay=0 as lorafleet's OptimConfig default (torch's AdamW default is 0.01)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return pm, opt, params


@torch.no_grad()
def check_same_loss(fleet, base, name, batch, args, tmp):
    """Untimed: lorafleet vs PEFT loss of one batch from the same weights, (1) as initialised
    (B = 0) and (2) with every factor nudged, so the LoRA path itself is compared. Restores the
    adapter's initial weights afterwards (forward_only leaves no gradients or optimizer state)."""
    from peft import PeftModel

    init = fleet.get_adapter_weights(name)
    g = torch.Generator().manual_seed(4321)
    nudged = fleet.get_adapter_weights(name)
    for _, t in nudged.tensors():
        t.add_(torch.randn(t.shape, generator=g) * 0.05)
    out = []
    for label, w in (("initial (B=0)", init), ("nudged factors", nudged)):
        fleet.set_adapter_weights(name, w)
        d = tmp / f"check_{len(out)}"
        fleet.save_adapter(name, d, format="peft")
        lf_losses = torch.tensor(fleet.forward_backward(batch, forward_only=True).losses, dtype=torch.float64)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), d)
        pf_losses = peft_losses(pm, batch).double()
        base_loss = float(peft_losses(base, batch).sum())
        out.append((label, float(lf_losses.sum()), float(pf_losses.sum()),
                    float((lf_losses - pf_losses).abs().max()), base_loss))
    fleet.set_adapter_weights(name, init)
    assert not fleet.pending_adapters()
    for label, lf_sum, pf_sum, max_ex, base_loss in out:
        rel = abs(lf_sum - pf_sum) / max(abs(pf_sum), 1e-30)
        print(f"  {label:<15} loss lorafleet {lf_sum:.6f}  peft {pf_sum:.6f}  |diff| {abs(lf_sum - pf_sum):.3e} "
              f"(rel {rel:.2e}, max per-example {max_ex:.2e}); base model {base_loss:.6f}")
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    import lorafleet as lf
    from lorafleet.data.datasets import DataCursor, load_examples
    from lorafleet.data.tokenizer import build_tokenizer

    t_start = time.perf_counter()
    K, N, W, bs = args.k, args.steps, args.warmup, args.batch
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
          f"lorafleet {lf.__version__}  python {sys.version.split()[0]}  cpus {os.cpu_count()}")
    print(f"threads: torch.get_num_threads()={torch.get_num_threads()}  interop={torch.get_num_interop_threads()}"
          f"{'' if args.threads else ' (torch default)'}{'  [--quick]' if args.quick else ''}")
    print(f"loadavg at start: {loadavg()}")

    # -- model, data (untimed)
    base = build_base(args)
    base.requires_grad_(False)
    tok = build_tokenizer()
    if len(tok) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is below the tokenizer's {len(tok)} tokens")
    exp = base.model.layers[0].mlp.experts
    n_params = sum(p.numel() for p in base.parameters())
    cfg = base.config
    print(f"model: debug qwen3_moe fp32, {n_params / 1e6:.2f}M params, layers={cfg.num_hidden_layers} "
          f"hidden={cfg.hidden_size} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}kv x{cfg.head_dim} "
          f"vocab={cfg.vocab_size}; experts={cfg.num_experts} top-{cfg.num_experts_per_tok} "
          f"moe_inter={cfg.moe_intermediate_size}: gate_up_proj {tuple(exp.gate_up_proj.shape)} down_proj "
          f"{tuple(exp.down_proj.shape)}; experts_implementation={cfg._experts_implementation!r} "
          f"(PEFT rows: {args.peft_experts_impl or 'same'}; lorafleet replaces the experts)")

    names, examples = [], {}
    for i in range(K):
        task = TASKS[i % len(TASKS)]
        name = f"a{i}_{task}"
        exs, st = load_examples(Path(args.data_dir) / f"{task}_train.jsonl", tok, name, max_length=args.max_length)
        names.append(name)
        examples[name] = exs
    # every adapter's batches for all W + N steps, drawn once: every row trains on exactly these
    batches = {}
    for i, name in enumerate(names):
        cur = DataCursor(examples[name], seed=args.seed + i)
        batches[name] = [cur.next_batch(bs) for _ in range(W + N)]
    timed_tokens = sum(n_tokens(b) for name in names for b in batches[name][W:])
    lens = [len(e.input_tokens) for name in names for b in batches[name] for e in b]
    pad_a = sum(K * bs * max(len(e.input_tokens) for name in names for e in batches[name][s]) for s in range(W, W + N))
    pad_b = sum(bs * max(len(e.input_tokens) for e in batches[name][s]) for name in names for s in range(W, W + N))
    print(f"data: {K} adapters x batch {bs} x {N} timed steps (+{W} warm-up), max_length {args.max_length}: "
          + ", ".join(f"{n} ({len(examples[n])} ex)" for n in names))
    print(f"  example positions min/mean/max {min(lens)}/{statistics.mean(lens):.1f}/{max(lens)}; timed tokens "
          f"{timed_tokens} per row; padded positions in the model: together {pad_a}, one adapter at a time {pad_b}")
    print(f"LoRA r={args.rank} alpha={args.alpha:g} on every attention linear + experts gate_up_proj/down_proj; "
          f"AdamW lr {args.lr:g} betas (0.9, 0.999) eps 1e-8 weight_decay 0")

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_train_")
    tmp = Path(tmp_ctx.name)

    # -- row A fleet: K adapters; their initial weights seed every other row (untimed)
    optim = lf.OptimConfig(lr=args.lr)
    acfg = [lf.AdapterConfig(rank=args.rank, alpha=args.alpha, target_modules="all-linear", experts=True,
                             seed=100 + i) for i in range(K)]
    fleet_a = lf.Fleet(copy.deepcopy(base), max_adapters=K, max_rank=args.rank)
    for name, c in zip(names, acfg):
        fleet_a.add_adapter(name, c)
        fleet_a.set_optimizer(name, optim)
    init_w = {n: fleet_a.get_adapter_weights(n) for n in names}
    n_lora = sum(t.numel() for _, t in init_w[names[0]].tensors())

    print(f"same-loss check (untimed), adapter {names[0]}, its first batch ({bs} examples), same weights:")
    check_same_loss(fleet_a, base, names[0], batches[names[0]][0], args, tmp)

    dirs = {}
    for n in names:
        dirs[n] = tmp / n
        fleet_a.save_adapter(n, dirs[n], format="peft")

    # -- row B: one PEFT model per adapter, loaded from lorafleet's export (untimed)
    pm = {}
    if "b" in args.rows:
        for n in names:
            pm[n] = make_peft(base, dirs[n], args)
        first = pm[names[0]][0]
        pcfg = first.peft_config["default"]
        n_peft = sum(p.numel() for p in pm[names[0]][2])
        print(f"PEFT models: LoraConfig r={pcfg.r} alpha={pcfg.lora_alpha} target_modules={sorted(pcfg.target_modules)} "
              f"target_parameters={sorted(pcfg.target_parameters)}; trainable {n_peft} per adapter "
              f"(lorafleet adapter: {n_lora})")

    # -- row C: a second fleet with the same adapters, trained one at a time (untimed setup)
    fleet_c = None
    if "c" in args.rows:
        fleet_c = lf.Fleet(copy.deepcopy(base), max_adapters=K, max_rank=args.rank)
        for n in names:
            fleet_c.add_adapter_from_weights(n, init_w[n])
            fleet_c.set_optimizer(n, optim)

    # -- step functions
    def step_a(s):
        fleet_a.forward_backward([e for n in names for e in batches[n][s]])
        fleet_a.optim_step()
        return n_tokens([e for n in names for e in batches[n][s]])

    def step_b(n, s):
        model, opt, _ = pm[n]
        loss = peft_losses(model, batches[n][s]).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n_tokens(batches[n][s])

    def step_c(n, s):
        fleet_c.forward_backward(batches[n][s])
        fleet_c.optim_step()
        return n_tokens(batches[n][s])

    rec = {r: {"wall": [], "cpu": [], "tok": []} for r in args.rows}

    def timed(r, fn, *a):
        c0, t0 = time.process_time(), time.perf_counter()
        tok_ = fn(*a)
        t1, c1 = time.perf_counter(), time.process_time()
        rec[r]["wall"].append(t1 - t0)
        rec[r]["cpu"].append(c1 - c0)
        rec[r]["tok"].append(tok_)

    # -- warm-up of row A (its first W steps, every adapter), untimed
    if "a" in args.rows:
        for s in range(W):
            step_a(s)
    a_chunks = [list(range(W + (N * k) // K, W + (N * (k + 1)) // K)) for k in range(K)]

    def slice_work(r, k):
        n = names[k]
        if r == "a":
            for s in a_chunks[k]:
                timed("a", step_a, s)
        elif r == "b":
            for s in range(W):
                step_b(n, s)  # untimed warm-up of this adapter's model
            for s in range(W, W + N):
                timed("b", step_b, n, s)
        else:
            for s in range(W):
                step_c(n, s)
            for s in range(W, W + N):
                timed("c", step_c, n, s)

    print(f"timing: rows {','.join(args.rows)} interleaved in {K} slices (A: {N} steps in {K} chunks; B, C: one "
          f"adapter each); loadavg before: {loadavg()}", flush=True)
    t_loop = time.perf_counter()
    for k in range(K):
        order = args.rows[k % len(args.rows):] + args.rows[: k % len(args.rows)]
        for r in order:
            slice_work(r, k)
    loop_s = time.perf_counter() - t_loop
    print(f"loadavg after: {loadavg()}  (1-minute figure above {torch.get_num_threads()} = other load on the "
          f"machine during the run)")

    # -- results
    res = {}
    for r in args.rows:
        wall, cpu, toks = rec[r]["wall"], rec[r]["cpu"], rec[r]["tok"]
        assert sum(toks) == timed_tokens, (r, sum(toks), timed_tokens)
        res[r] = dict(wall=sum(wall), cpu=sum(cpu), tps=sum(toks) / sum(wall), steps=len(wall),
                      med=statistics.median(wall), mn=min(wall), best_tps=max(t / w for t, w in zip(toks, wall)),
                      med_tps=statistics.median(t / w for t, w in zip(toks, wall)))
    print()
    hdr = (f"{'row':<4}{'what':<26}{'steps':>6}{'wall s':>8}{'tokens/s':>10}{'ms/step med':>12}{'min':>8}"
           f"{'ms/adapter-step':>16}{'best step tok/s':>16}{'cpu s':>8}{'cpu/wall':>9}")
    print(hdr)
    for r, v in res.items():
        print(f"{r.upper():<4}{ROW_LABELS[r].format(k=K):<26}{v['steps']:>6}{v['wall']:>8.2f}{v['tps']:>10.0f}"
              f"{v['med'] * 1e3:>12.1f}{v['mn'] * 1e3:>8.1f}{v['wall'] * 1e3 / (K * N):>16.1f}{v['best_tps']:>16.0f}"
              f"{v['cpu']:>8.2f}{v['cpu'] / v['wall']:>9.2f}")
    print(f"(timed: {N} optimizer steps per adapter, {timed_tokens} tokens per row; a row-A step covers all {K} "
          f"adapters, a B/C step one adapter; tokens/s = row tokens / row wall s; cpu s = process CPU time over "
          f"all threads; timed loop {loop_s:.1f} s; max RSS {maxrss_mib():.0f} MiB)")
    noisy = [r for r, v in res.items() if v["wall"] > 1.5 * v["steps"] * v["mn"]]
    if noisy:
        print(f"  NOTE: rows {','.join(r.upper() for r in noisy)} took over 1.5x (steps x their fastest step): the "
              f"machine was contended (threads stalled); total-time ratios are unreliable then -- compare the "
              f"'best step' ratios or rerun with --threads 1")

    print()

    def ratio(num, den, text):
        """Speedup of row ``den`` over row ``num`` (num's time / den's time; same tokens)."""
        if num in res and den in res:
            a, b = res[num], res[den]
            print(f"  {text}: {a['wall'] / b['wall']:.2f}x  (tokens/s {den.upper()} {b['tps']:.0f} vs {num.upper()} "
                  f"{a['tps']:.0f}; by cpu s: {a['cpu'] / b['cpu']:.2f}x; by best step tokens/s: "
                  f"{b['best_tps'] / a['best_tps']:.2f}x; by median step tokens/s: {b['med_tps'] / a['med_tps']:.2f}x)")

    ratio("b", "a", f"A vs B: speedup of lorafleet {K} together over PEFT {K} sequential (B time / A time)")
    ratio("c", "a", f"A vs C: speedup of lorafleet {K} together over lorafleet {K} sequential (batching)")
    ratio("b", "c", "C vs B: speedup of lorafleet sequential over PEFT sequential (implementation)")

    # -- untimed: did the rows train the same adapters? final loss on each adapter's first batch
    print()
    print("after training (untimed): loss of each adapter's first batch, initial -> final per row "
          "(same start, same batches, same AdamW):")
    with torch.no_grad():
        la = lc = None
        if "a" in args.rows:
            ra = fleet_a.forward_backward([e for n in names for e in batches[n][0]], forward_only=True).losses
            la = [sum(ra[i * bs:(i + 1) * bs]) for i in range(K)]
        if "c" in args.rows:
            rc = fleet_c.forward_backward([e for n in names for e in batches[n][0]], forward_only=True).losses
            lc = [sum(rc[i * bs:(i + 1) * bs]) for i in range(K)]
        worst = 0.0
        for i, n in enumerate(names):
            l0 = float(peft_losses(base, batches[n][0]).sum())
            lb = float(peft_losses(pm[n][0], batches[n][0]).sum()) if n in pm else None
            vals = [v for v in (la[i] if la else None, lb, lc[i] if lc else None) if v is not None]
            spread = (max(vals) - min(vals)) / max(abs(min(vals)), 1e-30) if len(vals) > 1 else 0.0
            worst = max(worst, spread)
            cols = "  ".join(f"{lbl} {v:.4f}" for lbl, v in (("A", la[i] if la else None), ("B", lb),
                                                                ("C", lc[i] if lc else None)) if v is not None)
            print(f"  {n:<10} initial {l0:.4f} -> {cols}   (rel spread {spread:.1e})")
        print(f"  largest relative spread between rows: {worst:.1e} (float32 round-off through {W + N} AdamW steps)")
    tmp_ctx.cleanup()
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
