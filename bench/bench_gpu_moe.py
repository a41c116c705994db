"""GPU benchmark, MoE: Qwen3-30B-A3B shape cut to a few layers, LoRA r=16 on attention and experts.

Random-init weights of the real Qwen3-30B-A3B shapes (hidden 2048, 128 experts top-8 with
normalized top-k weights, moe_intermediate 768, 32 q / 4 kv heads of 128, vocab 151936, rms eps
1e-6, rope theta 1e6, untied LM head), ``--layers`` decoder layers (default 4; use 12 for the
base-path figure), T = ``--seq`` tokens per sequence (default 1024), bf16 on CUDA; no downloads.
A benchmark measures; it asserts nothing about speed. Rows:

  base         frozen HF model only (no LoRA, transformers' experts implementation), batch
               ``--batch`` (8): forward + backward to the input embeddings -- calibration
  lf_attn      lorafleet, 1 adapter, LoRA on q/k/v/o only (the experts still run through
               lorafleet's grouped path, without LoRA), batch 8
  lf_exp       lorafleet, 1 adapter, attention + expert LoRA (per-expert A and B), batch 8
  lf_exp_8mix  lorafleet, 8 adapters (attention + experts) x 1 sequence each, mixed, batch 8
  lf_exp_pb    lorafleet, 1 adapter, attention + experts, batch ``--peft-batch`` (4)
  peft_tp      PEFT ``target_modules`` q/k/v/o + ``target_parameters`` mlp.experts.gate_up_proj /
               down_proj (transformers 5 fused experts), 1 adapter, batch 4
  peft_attn    PEFT attention-only, 1 adapter, batch 4
  lf_fit16 / peft_fit16   (``--max-batch-check``) lf_exp / peft_tp at batch 16: "fits" or "OOM"

Every row ends in the same loss: lorafleet's chunked LM head (``--chunk`` rows of fp32 logits at a
time) + summed cross-entropy; no optimizer step; LoRA B random (non-zero); PEFT adapters in the
base dtype unless ``--peft-fp32-adapters``. The lorafleet rows share one fleet of 8 slots (its
bank, 8 slots x 128 experts, counts in their peak memory).

MFU basis: 4 * N_active * tokens (forward + input-gradient backward of the frozen base),
N_active = matmul parameters one token passes through: attention q/k/v/o, the router, top-k
experts' gate_up and down, and the LM head; not the embedding table, attention scores or LoRA.

    PYTHONPATH=src python bench/bench_gpu_moe.py                       # H100: 4 layers, bf16
    PYTHONPATH=src python bench/bench_gpu_moe.py --max-batch-check --json out/moe.json
    PYTHONPATH=src python bench/bench_gpu_moe.py --layers 12 --rows base   # base-path figure
    PYTHONPATH=src python bench/bench_gpu_moe.py --tiny                # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import gpu_common as G  # noqa: E402

# real Qwen3-30B-A3B (config.json), layers cut by --layers
REAL = dict(hidden=2048, moe_inter=768, experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128, vocab=151936,
            layers=4, seq=1024)
TINY = dict(hidden=64, moe_inter=32, experts=8, top_k=2, heads=4, kv_heads=2, head_dim=16, vocab=512, layers=2,
            seq=32)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LABELS = {"base": "frozen base only (HF)", "lf_attn": "lorafleet attention-only, 1 adapter",
          "lf_exp": "lorafleet attn+experts, 1 adapter", "lf_exp_8mix": "lorafleet attn+experts, adapters mixed",
          "lf_exp_pb": "lorafleet attn+experts, 1 adapter, PEFT batch", "peft_tp": "PEFT target_parameters",
          "peft_attn": "PEFT attention-only", "lf_fit16": "lorafleet fit check", "peft_fit16": "PEFT fit check"}
ROWS = list(LABELS)[:7]
FIT = 16  # batch of the --max-batch-check rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    G.add_common_args(p)
    G.add_model_args(p, REAL, TINY)
    p.add_argument("--batch", type=int, default=8, help="sequences per step of base / lf_attn / lf_exp / lf_exp_8mix")
    p.add_argument("--peft-batch", type=int, default=4, help="batch of the PEFT comparison (peft_*, lf_exp_pb)")
    p.add_argument("--adapters", type=int, default=8, help="adapters in lf_exp_8mix (batch must be a multiple)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of rows to run (of {','.join(ROWS)})")
    p.add_argument("--max-batch-check", action="store_true", help=f"also try batch {FIT} for lorafleet and PEFT")
    p.add_argument("--experts-impl", default=None,
                   help="experts_implementation of the HF / PEFT models (default: transformers' own)")
    args = p.parse_args(argv)
    G.finish_common_args(args, iters=10, warmup=3)
    G.finish_model_args(args, REAL, TINY)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(args.rows) - set(ROWS):
        p.error(f"unknown rows {sorted(set(args.rows) - set(ROWS))}")
    if args.batch % args.adapters:
        p.error(f"--batch ({args.batch}) must be a multiple of --adapters ({args.adapters})")
    return args


def moe_config(args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=6144,
                          moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                          num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", rms_norm_eps=1e-6,
                          max_position_embeddings=max(40960, args.seq),
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                          attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False,
                          use_sliding_window=False, output_router_logits=False, use_cache=False)


def active_params(args) -> int:
    H, q, kv = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    layer = H * q + 2 * H * kv + q * H + args.experts * H + args.top_k * 3 * H * args.moe_inter
    return args.layers * layer + args.vocab * H


def build(args):
    model = G.build_causal_lm(moe_config(args), args.device, args.dtype, args.seed)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    return model


def make_data(args, n):
    g = torch.Generator().manual_seed(args.seed + 1)
    seqs = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
    ids, tgt = seqs[:, :-1].to(args.device), seqs[:, 1:].to(args.device)
    return seqs.tolist(), ids, tgt, torch.ones_like(ids)


def hf_step(backbone, head, data, n, chunk, embeds=False):
    """Forward + chunked loss + backward of the first n sequences through an HF / PEFT model."""
    _, ids, tgt, mask = data

    def step():
        kw = {"input_ids": ids[:n]}
        if embeds:  # frozen base: backward to the input embeddings
            kw = {"inputs_embeds": backbone.embed_tokens(ids[:n]).detach().requires_grad_()}
        h = backbone(**kw, attention_mask=mask[:n], use_cache=False).last_hidden_state
        loss = G.chunked_loss(h, head.weight, tgt[:n], chunk)
        loss.backward()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------- systems
def run_base_and_fleet(b, args, data, n_act):
    import lorafleet as lf

    T, B, Pb, want = args.seq, args.batch, args.peft_batch, args.rows
    model = build(args)
    if "base" in want:
        b.run("base", f"frozen base only (HF), batch {B}", hf_step(model.model, model.lm_head, data, B, args.chunk,
              embeds=True), tokens=B * T, flops=4 * n_act * B * T, adapters=0, batch=B)
    lf_rows = [r for r in want if r.startswith("lf_")]
    if not lf_rows and not args.max_batch_check:
        return
    fleet = lf.Fleet(model, max_adapters=args.adapters, max_rank=args.rank, expert_lora=True)
    fleet.logprob_chunk = args.chunk
    params = list(fleet.lora_parameters())
    seqs = data[0]

    def add(names, experts):
        for i, n in enumerate(names):
            fleet.add_adapter(n, lf.AdapterConfig(rank=args.rank, alpha=args.alpha, target_modules=ATTN,
                                                  experts=experts, seed=100 + i))
        G.randomize_lora_B(fleet.model.named_parameters(), ("lora_B", "gate_up_B", "down_B"), 0.01,
                           args.seed + 2, args.device)

    def row(key, label, adapters, **kw):
        ex = [lf.Example(a, s[:-1], s[1:]) for a, s in zip(adapters, seqs)]
        n_tok = len(ex) * T
        return b.run(key, label, lambda: sum(fleet.forward_backward(ex).losses), tokens=n_tok,
                     flops=4 * n_act * n_tok, before=lambda: G.zero_grads(params), adapters=len(set(adapters)),
                     batch=len(ex), **kw)

    if "lf_attn" in want:
        add(["attn"], experts=False)
        row("lf_attn", f"lorafleet attention-only, 1 adapter, batch {B}", ["attn"] * B)
        fleet.remove_adapter("attn")
    names = [f"x{i}" for i in range(args.adapters)]
    add(names, experts=True)
    per = B // args.adapters
    if "lf_exp" in want:
        row("lf_exp", f"lorafleet attn+experts, 1 adapter, batch {B}", [names[0]] * B)
    if "lf_exp_8mix" in want:
        row("lf_exp_8mix", f"lorafleet attn+experts, {args.adapters} adapters mixed, batch {B}",
            [n for n in names for _ in range(per)])
    if "lf_exp_pb" in want:
        row("lf_exp_pb", f"lorafleet attn+experts, 1 adapter, batch {Pb}", [names[0]] * Pb)
    if args.max_batch_check:
        row("lf_fit16", f"lorafleet attn+experts, 1 adapter, batch {FIT} (fit check)", [names[0]] * FIT,
            iters=1, warmup=1)


def run_peft(b, args, data, n_act, key, experts, fit_check=False):
    from peft import LoraConfig, get_peft_model

    T, Pb = args.seq, args.peft_batch
    model = build(args)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=ATTN,
                     target_parameters=EXPERT_PARAMS if experts else None)
    pm = get_peft_model(model, cfg, autocast_adapter_dtype=args.peft_fp32_adapters)
    G.randomize_lora_B(pm.named_parameters(), ("lora_B.default.weight",), 0.01, args.seed + 2, args.device)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    backbone, head = pm.base_model.model.model, pm.base_model.model.lm_head
    what = "attn + target_parameters experts" if experts else "attention-only"
    zero = lambda: G.zero_grads(params)  # noqa: E731
    if key in args.rows:
        b.run(key, f"PEFT {what}, 1 adapter, batch {Pb}", hf_step(backbone, head, data, Pb, args.chunk),
              tokens=Pb * T, flops=4 * n_act * Pb * T, before=zero, adapters=1, batch=Pb)
    if fit_check:
        b.run("peft_fit16", f"PEFT {what}, batch {FIT} (fit check)", hf_step(backbone, head, data, FIT, args.chunk),
              tokens=FIT * T, flops=4 * n_act * FIT * T, before=zero, adapters=1, batch=FIT, iters=1, warmup=1)


# ----------------------------------------------------------------------------- main
def report(b, args):
    ok = b.ok
    print("ratios:")
    a, e = ok("lf_attn"), ok("lf_exp")
    b.ratio("expert_overhead", f"expert-LoRA overhead over attention-only LoRA (lorafleet, batch {args.batch}), time",
            e["median_s"] / a["median_s"] - 1 if a and e else None, target=("<=", 0.05), fmt="{:+.1%}",
            needs=("lf_attn", "lf_exp"))
    lp, pt = ok("lf_exp_pb"), ok("peft_tp")
    b.ratio("lf_vs_peft_tp", f"lorafleet vs PEFT target_parameters, attn+experts, batch {args.peft_batch}, tokens/s",
            lp["tokens_per_s"] / pt["tokens_per_s"] if lp and pt else None, target=(">=", 1.4),
            needs=("lf_exp_pb", "peft_tp"))
    mem = lp and pt and lp.get("peak_mem_gib") and pt.get("peak_mem_gib")
    b.ratio("mem_lf_vs_peft", f"peak memory lorafleet / PEFT target_parameters, batch {args.peft_batch}",
            lp["peak_mem_gib"] / pt["peak_mem_gib"] if mem else None, target=("<", 1.0), needs=("lf_exp_pb", "peft_tp"),
            na=None if args.device.type == "cuda" else "peak memory is measured on CUDA only")
    base, m8, pa = ok("base"), ok("lf_exp_8mix"), ok("peft_attn")
    b.ratio("lf_overhead", "LoRA (attn+experts, 1 adapter) overhead over frozen base, time",
            e["median_s"] / base["median_s"] - 1 if e and base else None, fmt="{:+.1%}", needs=("lf_exp", "base"))
    b.ratio("per_token_8_vs_1", f"per-token cost, {args.adapters} adapters mixed vs 1 (same batch), extra",
            e["tokens_per_s"] / m8["tokens_per_s"] - 1 if e and m8 else None, fmt="{:+.1%}",
            needs=("lf_exp", "lf_exp_8mix"))
    b.ratio("peft_expert_overhead", "PEFT expert-LoRA overhead over PEFT attention-only, time",
            pt["median_s"] / pa["median_s"] - 1 if pt and pa else None, fmt="{:+.1%}", needs=("peft_tp", "peft_attn"))
    if args.max_batch_check:
        for key, who in (("lf_fit16", "lorafleet"), ("peft_fit16", "PEFT target_parameters")):
            r = next((r for r in b.rows if r["key"] == key), None)
            if r is None:
                verdict = "not run"
            elif r.get("error"):
                verdict = "OOM" if r["error"].endswith("OOM") else f"failed ({r['error']})"
            else:
                mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""
                verdict = f"fits ({r['tokens_per_s']:.0f} tokens/s{mem})"
            print(f"  max-batch check, {who} batch {FIT} x {args.seq}: {verdict}")


def main(argv=None):
    args = parse_args(argv)
    n_act = active_params(args)
    cfg = {
        "model": (f"Qwen3-30B-A3B shape, {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-"
                  f"{args.top_k}, moe_intermediate {args.moe_inter}, heads {args.heads}/{args.kv_heads}kv "
                  f"x{args.head_dim}, vocab {args.vocab}, random init"),
        "N_active (MFU basis: 4*N*tokens)": f"{n_act / 1e9:.4f}B (attention, router, top-k experts, LM head)",
        "tokens": f"T={args.seq}; batch {args.batch} (lorafleet rows), {args.peft_batch} (PEFT comparison)",
        "LoRA": (f"r={args.rank} alpha={args.alpha:g} on {','.join(ATTN)} (+ experts gate_up/down where stated); "
                 f"B ~ N(0, 0.01)"),
        "experts_implementation (HF/PEFT)": args.experts_impl or "transformers default",
        "PEFT adapters": "fp32 (autocast)" if args.peft_fp32_adapters else "base dtype (autocast_adapter_dtype=False)",
    }
    b = G.Bench("lorafleet GPU benchmark: MoE (Qwen3-30B-A3B shape)", args, cfg)
    data = make_data(args, max(args.batch, args.peft_batch, FIT if args.max_batch_check else 0))
    fit = args.max_batch_check
    lf_keys = [(k, LABELS[k]) for k in ROWS[:5] if k in args.rows] + ([("lf_fit16", LABELS["lf_fit16"])] if fit else [])
    b.system("lorafleet", lf_keys, run_base_and_fleet, b, args, data, n_act)
    if "peft_tp" in args.rows or args.max_batch_check:
        b.system("peft_tp", [(k, LABELS[k]) for k, on in (("peft_tp", "peft_tp" in args.rows),
                                                                     ("peft_fit16", fit)) if on],
                 run_peft, b, args, data, n_act, "peft_tp", True, fit)
    if "peft_attn" in args.rows:
        b.system("peft_attn", [("peft_attn", LABELS["peft_attn"])], run_peft, b, args, data, n_act, "peft_attn",
                 False)
    b.table()
    report(b, args)
    return b.finish()


if __name__ == "__main__":
    main()
