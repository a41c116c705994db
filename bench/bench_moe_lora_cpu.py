"""CPU benchmark: forward + backward of a mid-size MoE stack with expert LoRA, lorafleet vs PEFT.

A benchmark measures; nothing here asserts anything about speed. One run prints, side by side:

  a. peft-1       PEFT ``target_parameters`` expert LoRA, one adapter, whole batch
                  (PEFT folds W + dW for every expert on every forward)
  b. fleet-1      lorafleet, every row on the same adapter (pool of ``--adapters`` slots)
  b1. fleet-1/p1  (optional, ``--rows`` with ``b1``) lorafleet, one adapter in a pool of 1 slot
  c. fleet-N-mix  lorafleet, ``--adapters`` adapters mixed in one batch (one row group each)
  d. peft-N-tmux  PEFT time-multiplexing: ``--adapters`` separate PEFT steps (``set_adapter``),
                  each on its adapter's rows; one "step" is all of them

Each row: ``--warmup`` untimed iterations, then the median of ``--iters`` timed iterations of
forward + cross-entropy + backward (gradients zeroed, untimed, before each iteration). Rows are
timed round-robin so background load spreads over all of them; wall median, wall min and process
CPU time are all printed (on a loaded machine, prefer ``--threads 1`` and the min / cpu columns).

    python bench/bench_moe_lora_cpu.py            # defaults (a few minutes on 2 cores)
    python bench/bench_moe_lora_cpu.py --quick    # smoke run, seconds (1 thread)
    python bench/bench_moe_lora_cpu.py --threads 1  # steadier numbers on a shared machine
    python bench/bench_moe_lora_cpu.py --profile c  # + torch.profiler top ops of one step of row c
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROW_LABELS = {
    "a": "peft-1 (target_parameters)",
    "b": "lorafleet-1",
    "b1": "lorafleet-1 (pool of 1 slot)",
    "c": "lorafleet-{n}-mixed",
    "d": "peft-{n} time-multiplexed",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-inter", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--adapters", type=int, default=8, help="adapters in the mixed / time-multiplexed rows")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per row (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice; 1 with --quick). 1 thread is the "
                        "robust choice on a machine other processes load: multi-threaded small ops stall at "
                        "every OpenMP barrier whenever one of their threads is descheduled")
    p.add_argument("--rows", default="a,b,c,d", help="comma list of rows to run: a,b,b1,c,d")
    p.add_argument("--peft-experts-impl", default=None,
                   help="experts_implementation for the PEFT model (default: transformers' default)")
    p.add_argument("--profile", default=None, metavar="ROW",
                   help="after the table, profile one step of ROW with torch.profiler and print top ops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (< 30 s)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.experts, args.top_k, args.moe_inter = 128, 2, 8, 2, 64
        args.heads, args.kv_heads, args.head_dim, args.vocab = 4, 2, 32, 256
        args.batch, args.seq, args.rank, args.alpha = 8, 32, 8, 16.0
        args.iters, args.warmup = 2, 1
        if args.threads is None:
            args.threads = 1
    if args.batch % args.adapters:
        p.error(f"--batch ({args.batch}) must be a multiple of --adapters ({args.adapters})")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROW_LABELS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROW_LABELS)}")
    return args


# ---------------------------------------------------------------------------- model
def build_base(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.moe_inter,  # unused: every layer is sparse
        moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
        attn_implementation="eager",
        torch_dtype=torch.float32,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(cfg).float()
    # explicit random init of the packed experts and the routers (std 0.02), base frozen
    for layer in model.model.layers:
        ex = layer.mlp.experts
        ex.gate_up_proj.data.normal_(0.0, 0.02)
        ex.down_proj.data.normal_(0.0, 0.02)
        layer.mlp.gate.weight.data.normal_(0.0, 0.02)
    model.requires_grad_(False)
    model.eval()  # no dropout anywhere; autograd is still on
    return model


def linear_target_names(model) -> list[str]:
    """Short names of every nn.Linear in the decoder layers (routers are not nn.Linear here)."""
    names = set()
    for path, m in model.named_modules():
        if path.startswith("model.layers.") and isinstance(m, torch.nn.Linear):
            names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def make_peft(base, args, targets, names):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    if args.peft_experts_impl:
        model.set_experts_implementation(args.peft_experts_impl)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(targets),
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    pm.set_adapter(names[0])
    return pm


def make_fleet(base, args, n_adapters, pool):
    import lorafleet as lf

    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=pool, max_rank=args.rank)
    names = [f"f{i}" for i in range(n_adapters)]
    for i, n in enumerate(names):
        fleet.add_adapter(n, lf.AdapterConfig(rank=args.rank, alpha=args.alpha, target_modules="all-linear",
                                              experts=True, seed=100 + i))
    return fleet, names


# ------------------------------------------------------------------ sanity (untimed)
def copy_peft_into_fleet(pm, peft_name, fleet, fleet_name):
    """PEFT's LoRA factors of one adapter -> a fleet slot, through in-memory AdapterWeights
    (no file formats). Layout mapping as in tests/peft_ref.py."""
    from peft.tuners.lora.layer import Linear as PeftLinear, ParamWrapper

    w = fleet.get_adapter_weights(fleet_name)
    r = fleet.adapters[fleet_name].rank
    seen_dense, seen_exp = set(), set()
    for name, m in pm.named_modules():
        if not (isinstance(m, (PeftLinear, ParamWrapper)) and peft_name in m.lora_A):
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        A = m.lora_A[peft_name].weight.detach()
        B = m.lora_B[peft_name].weight.detach()
        if isinstance(m, ParamWrapper):
            proj = {"gate_up_proj": "gate_up", "down_proj": "down"}[m.parameter_name]
            E = m.num_experts
            a = A.reshape(E, r, -1)  # expert-slowest
            b = B.reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous()  # expert-fastest
            projs = w.experts[path]
            assert projs[proj][0].shape == a.shape and projs[proj][1].shape == b.shape, (path, proj)
            projs[proj] = (a.clone(), b.clone())
            seen_exp.add((path, proj))
        else:
            assert w.dense[path][0].shape == A.shape and w.dense[path][1].shape == B.shape, path
            w.dense[path] = (A.clone(), B.clone())
            seen_dense.add(path)
    assert seen_dense == set(w.dense), (sorted(set(w.dense) - seen_dense)[:3])
    assert seen_exp == {(p, k) for p in w.experts for k in ("gate_up", "down")}
    fleet.set_adapter_weights(fleet_name, w)


def sanity_check(base, pm, fleet, fleet_name, ids):
    """Give PEFT's adapter non-zero B, copy it into a fleet slot, compare logits (untimed)."""
    g = torch.Generator().manual_seed(1234)
    for n, p in pm.named_parameters():
        if ".lora_B." in n and n.endswith(f".{pm.active_adapter}.weight"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    copy_peft_into_fleet(pm, pm.active_adapter, fleet, fleet_name)
    lp = pm(input_ids=ids).logits.detach()
    lf_ = fleet.forward(ids, adapters=[fleet_name] * ids.shape[0]).logits.detach()
    lb = base(input_ids=ids).logits.detach()
    diff = (lp - lf_).abs().max().item()
    rel = ((lp.double() - lf_.double()).norm() / lp.double().norm()).item()
    effect = ((lp.double() - lb.double()).norm() / lb.double().norm()).item()
    finite = bool(torch.isfinite(lp).all() and torch.isfinite(lf_).all())
    ok = finite and rel < 1e-4 and effect > 10 * rel
    print(f"sanity (untimed, same weights): finite={finite}  max|peft-fleet|={diff:.3e}  "
          f"rel={rel:.3e}  (LoRA effect vs base rel={effect:.3e})  -> {'OK' if ok else 'MISMATCH'}")
    return ok


# ------------------------------------------------------------------------- timing
def ce_loss(logits, ids, weight=1.0):
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1)) * weight


def zero_grads(params):
    for p in params:
        p.grad = None


def maxrss_mib():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() == "Linux" else kb / 2**20


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def run_rows(rows, steps, params, iters, warmup):
    """Warm every row up, then time the rows round-robin (a b c d a b c d ...), so that load from
    other processes on the machine smears over all rows instead of landing on one.
    Returns {row: (wall times, cpu times, maxRSS growth during its warm-up)}."""
    out = {}
    for r in rows:
        rss0 = maxrss_mib()
        for _ in range(warmup):
            zero_grads(params[r])
            steps[r]()
        zero_grads(params[r])
        out[r] = ([], [], maxrss_mib() - rss0)
    for _ in range(iters):
        for r in rows:
            zero_grads(params[r])
            c0, t0 = time.process_time(), time.perf_counter()
            steps[r]()
            t1, c1 = time.perf_counter(), time.process_time()
            out[r][0].append(t1 - t0)
            out[r][1].append(c1 - c0)
    for r in rows:
        zero_grads(params[r])
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    import lorafleet

    t_start = time.perf_counter()
    n = args.adapters
    rows_per = args.batch // n
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
          f"lorafleet {lorafleet.__version__}  python {sys.version.split()[0]}")
    print(f"threads: torch.get_num_threads()={torch.get_num_threads()}  interop={torch.get_num_interop_threads()}"
          f"{'  [--quick]' if args.quick else ''}")

    base = build_base(args)
    targets = linear_target_names(base)
    n_params = sum(p.numel() for p in base.parameters())
    exp = base.model.layers[0].mlp.experts
    print(f"model: Qwen3-MoE random init fp32, {n_params / 1e6:.1f}M params, layers={args.layers} "
          f"hidden={args.hidden} heads={args.heads}/{args.kv_heads}kv x{args.head_dim} vocab={args.vocab}")
    print(f"  experts={args.experts} top-{args.top_k} moe_inter={args.moe_inter}: "
          f"gate_up_proj {tuple(exp.gate_up_proj.shape)} down_proj {tuple(exp.down_proj.shape)}; "
          f"experts_implementation={base.config._experts_implementation!r} (PEFT rows"
          f"{'=' + args.peft_experts_impl if args.peft_experts_impl else ' use it'}; lorafleet replaces the experts)")
    print(f"batch {args.batch} x {args.seq} tokens = {args.batch * args.seq} tokens/step; LoRA r={args.rank} "
          f"alpha={args.alpha:g} on {targets} + experts gate_up_proj/down_proj; {n} adapters "
          f"({rows_per} row(s) each) in rows c/d")

    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    peft_names = [f"p{i}" for i in range(n)]
    fleet_pool = max(n, 1)

    # -- build every model up front (untimed)
    pm1 = pmN = fleet = fleet1 = None
    if "a" in args.rows or "b" in args.rows or "b1" in args.rows:
        pm1 = make_peft(base, args, targets, peft_names[:1])
    if "d" in args.rows:
        pmN = make_peft(base, args, targets, peft_names)
    if any(r in args.rows for r in ("b", "c")):
        fleet, fnames = make_fleet(base, args, n, fleet_pool)
    if "b1" in args.rows:
        fleet1, _ = make_fleet(base, args, 1, 1)
    n_lora_peft = sum(p.numel() for p in pm1.parameters() if p.requires_grad) if pm1 is not None else 0
    if fleet is not None:
        n_lora_fleet = sum(p.numel() for p in fleet.lora_parameters())
        print(f"trainable LoRA params: PEFT one adapter {n_lora_peft / 1e6:.2f}M; lorafleet bank "
              f"({fleet_pool} slots x r{args.rank}) {n_lora_fleet / 1e6:.2f}M")

    # -- sanity check, untimed
    ok = True
    if pm1 is not None and (fleet is not None or fleet1 is not None):
        f, nm = (fleet, "f0") if fleet is not None else (fleet1, "f0")
        ok = sanity_check(base, pm1, f, nm, ids[: min(2, args.batch)])
        if fleet1 is not None and fleet is not None:
            copy_peft_into_fleet(pm1, pm1.active_adapter, fleet1, "f0")

    # -- step closures
    def peft1_step():
        ce_loss(pm1(input_ids=ids).logits, ids).backward()

    def fleet_step(fl, names):
        def step():
            ce_loss(fl.forward(ids, adapters=names).logits, ids).backward()
        return step

    groups = [(peft_names[i], ids[i * rows_per:(i + 1) * rows_per]) for i in range(n)]

    def peft_tmux_step():
        for name, sub in groups:
            pmN.set_adapter(name)
            ce_loss(pmN(input_ids=sub).logits, sub, weight=sub.shape[0] / args.batch).backward()

    steps, params = {}, {}
    if "a" in args.rows:
        steps["a"], params["a"] = peft1_step, [p for p in pm1.parameters() if p.requires_grad]
    if "b" in args.rows:
        steps["b"], params["b"] = fleet_step(fleet, ["f0"] * args.batch), list(fleet.lora_parameters())
    if "b1" in args.rows:
        steps["b1"], params["b1"] = fleet_step(fleet1, ["f0"] * args.batch), list(fleet1.lora_parameters())
    if "c" in args.rows:
        mixed = [fnames[i // rows_per] for i in range(args.batch)]
        steps["c"], params["c"] = fleet_step(fleet, mixed), list(fleet.lora_parameters())
    if "d" in args.rows:
        # every adapter's LoRA params get gradients over a step; set_adapter flips requires_grad
        steps["d"], params["d"] = peft_tmux_step, [p for nme, p in pmN.named_parameters() if "lora_" in nme]

    tokens = args.batch * args.seq
    print(f"timing: warm-up {args.warmup}, then {args.iters} iterations per row, rows interleaved; "
          f"loadavg before: {loadavg()}", flush=True)
    raw = run_rows(args.rows, steps, params, args.iters, args.warmup)
    results = {}
    for r, (times, cpus, drss) in raw.items():
        results[r] = (statistics.median(times), min(times), statistics.median(cpus), drss)
        print(f"  {r:<2} {ROW_LABELS[r].format(n=n):<30} wall ms=[{', '.join(f'{t * 1e3:.0f}' for t in times)}]  "
              f"cpu ms=[{', '.join(f'{t * 1e3:.0f}' for t in cpus)}]")
    print(f"loadavg after: {loadavg()}  (above the {torch.get_num_threads()} threads used here = other load on "
          f"the machine; trust 'min ms' and 'cpu ms' more than the median then)")

    print()
    print(f"{'row':<4}{'what':<31}{'ms/step med':>12}{'min ms':>9}{'cpu ms':>9}{'tokens/s':>9}"
          f"{'ms/1k tok':>10}{'+RSS MiB':>9}")
    for r, (med, mn, cpu, drss) in results.items():
        print(f"{r:<4}{ROW_LABELS[r].format(n=n):<31}{med * 1e3:>12.1f}{mn * 1e3:>9.1f}{cpu * 1e3:>9.0f}"
              f"{tokens / med:>9.0f}{med * 1e3 / tokens * 1000:>10.2f}{drss:>9.0f}")
    print(f"(each step: the same {tokens} tokens, forward + CE + backward; median of {args.iters}; cpu ms = process "
          f"CPU time, all threads; +RSS = growth of the process's max RSS during the row's warm-up, 0 when an "
          f"earlier row already peaked higher; max RSS at end {maxrss_mib():.0f} MiB)")

    print()
    def ratio(num, den, text):
        if num in results and den in results:
            print(f"  {text}: {results[num][0] / results[den][0]:.2f}x  "
                  f"(by min: {results[num][1] / results[den][1]:.2f}x, by cpu: {results[num][2] / results[den][2]:.2f}x)")
    ratio("a", "b", "speedup lorafleet-1 vs PEFT-1 (PEFT time / lorafleet time)")
    ratio("d", "c", f"speedup lorafleet-{n}-mixed vs PEFT-{n}-time-multiplexed")
    ratio("c", "b", f"lorafleet per-token cost, {n} adapters vs 1 (mixed / single)")
    ratio("b", "b1", f"lorafleet-1: pool of {fleet_pool} slots vs pool of 1 (time ratio)")
    ratio("d", "a", f"PEFT per-token cost, {n} adapters time-multiplexed vs 1")
    if not ok:
        print("  NOTE: the untimed sanity check reported a mismatch (see above)")

    if args.profile:
        r = args.profile
        if r not in steps:
            print(f"--profile {r}: row not run")
        else:
            from torch.profiler import ProfilerActivity, profile

            zero_grads(params[r])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[r]()
            zero_grads(params[r])
            print(f"\ntorch.profiler, one step of row {r} ({ROW_LABELS[r].format(n=n)}), top ops by self CPU time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=44))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
