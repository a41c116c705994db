"""GPU benchmark, dense: Qwen3-8B shape cut to a few layers, LoRA r=16 on every linear.

Random-init weights of the real Qwen3-8B shapes (hidden 4096, intermediate 12288, 32 q / 8 kv
heads of 128, vocab 151936, rms eps 1e-6, rope theta 1e6, untied LM head), ``--layers`` decoder
layers (default 8), T = ``--seq`` tokens per sequence (default 1024), bf16 on CUDA; no downloads.
A benchmark measures; it asserts nothing about speed. Rows, side by side in one run:

  base        frozen HF model only (no LoRA), batch 8: forward + backward to the input
              embeddings (the dX chain a LoRA backward needs) -- the calibration row
  lf_1        lorafleet, 1 adapter, batch 8 (``Fleet.forward_backward``)
  lf_8mix     lorafleet, 8 adapters x 1 sequence each, mixed in one step
  lf_16mix    lorafleet, 16 adapters x 1 sequence each (batch 16)
  peft_tmux   PEFT time-multiplexing the same 8 adapters: ``set_adapter`` + forward/backward of
              its own sequence, 8 times; one "step" = all 8
  peft_1      PEFT, one adapter, batch 8

Every row ends in the same loss: the final hidden states through lorafleet's chunked LM head
(``engine/logprobs.token_logprobs``, ``--chunk`` rows of fp32 logits at a time) and the summed
cross-entropy. No optimizer step. LoRA B is random (non-zero) everywhere. PEFT's adapters stay in
the base dtype (``autocast_adapter_dtype=False``, as lorafleet's bank) unless
``--peft-fp32-adapters``.

MFU basis: 4 * N * tokens per step (forward 2NT + input-gradient backward 2NT; the frozen base
computes no weight gradients), N = parameters of the matmuls each token passes through: every
decoder-layer linear plus the LM head, excluding the embedding table. Attention score FLOPs,
LoRA FLOPs and the chunked head's backward recompute are not counted.

    PYTHONPATH=src python bench/bench_gpu_dense.py                 # H100: real shapes, bf16
    PYTHONPATH=src python bench/bench_gpu_dense.py --json out/dense.json
    PYTHONPATH=src python bench/bench_gpu_dense.py --tiny          # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import gpu_common as G  # noqa: E402

# real Qwen3-8B (config.json), layers cut by --layers
REAL = dict(hidden=4096, inter=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936, layers=8, seq=1024)
TINY = dict(hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, vocab=512, layers=2, seq=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    G.add_common_args(p)
    G.add_model_args(p, REAL, TINY)
    p.add_argument("--batch", type=int, default=8, help="sequences per step of base / lf_1 / lf_8mix / peft_1")
    p.add_argument("--adapters", type=int, default=8, help="adapters in lf_8mix and peft_tmux (one sequence each)")
    p.add_argument("--many", type=int, default=16, help="adapters (= sequences) in lf_16mix")
    args = p.parse_args(argv)
    G.finish_common_args(args, iters=10, warmup=3)
    G.finish_model_args(args, REAL, TINY)
    if args.batch != args.adapters:
        p.error("--batch must equal --adapters (lf_8mix gives each adapter one sequence of the batch)")
    return args


def qwen3_config(args):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.head_dim, hidden_act="silu",
                       max_position_embeddings=max(40960, args.seq), rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False,
                       use_sliding_window=False, use_cache=False,
                       **({"bos_token_id": 151643, "eos_token_id": 151645} if args.vocab > 151645 else {}))


def matmul_params(args) -> int:
    """N of the MFU basis: decoder-layer linears + LM head (no embedding table)."""
    H, q, kv = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    layer = H * q + 2 * H * kv + q * H + 3 * H * args.inter
    return args.layers * layer + args.vocab * H


def make_data(args, n):
    g = torch.Generator().manual_seed(args.seed + 1)
    seqs = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
    ids, tgt = seqs[:, :-1].to(args.device), seqs[:, 1:].to(args.device)
    return seqs.tolist(), ids, tgt, torch.ones_like(ids)


# ---------------------------------------------------------------------------- systems
def run_base_and_fleet(b, args, data, n_mm):
    import lorafleet as lf

    seqs, ids, tgt, mask = data
    B, T = args.batch, args.seq
    model = G.build_causal_lm(qwen3_config(args), args.device, args.dtype, args.seed)

    def base_step():
        emb = model.model.embed_tokens(ids[:B]).detach().requires_grad_()
        h = model.model(inputs_embeds=emb, attention_mask=mask[:B], use_cache=False).last_hidden_state
        loss = G.chunked_loss(h, model.lm_head.weight, tgt[:B], args.chunk)
        loss.backward()
        return loss.detach()

    b.run("base", f"frozen base only (HF), batch {B}", base_step, tokens=B * T, flops=4 * n_mm * B * T,
          adapters=0, batch=B)

    fleet = lf.Fleet(model, max_adapters=max(args.many, args.adapters), max_rank=args.rank)
    fleet.logprob_chunk = args.chunk
    names = [f"a{i}" for i in range(max(args.many, args.adapters))]
    for i, n in enumerate(names):
        fleet.add_adapter(n, lf.AdapterConfig(rank=args.rank, alpha=args.alpha, target_modules=TARGETS,
                                              experts=False, seed=100 + i))
    G.randomize_lora_B(fleet.model.named_parameters(), ("lora_B",), 0.01, args.seed + 2, args.device)
    params = list(fleet.lora_parameters())

    def fleet_row(key, label, adapters):
        ex = [lf.Example(a, s[:-1], s[1:]) for a, s in zip(adapters, seqs)]
        n_tok = len(ex) * T
        b.run(key, label, lambda: sum(fleet.forward_backward(ex).losses), tokens=n_tok, flops=4 * n_mm * n_tok,
              before=lambda: G.zero_grads(params), adapters=len(set(adapters)), batch=len(ex))

    fleet_row("lf_1", f"lorafleet, 1 adapter, batch {B}", [names[0]] * B)
    fleet_row("lf_8mix", f"lorafleet, {args.adapters} adapters x 1 seq, mixed", names[: args.adapters])
    fleet_row("lf_16mix", f"lorafleet, {args.many} adapters x 1 seq, mixed", names[: args.many])


def run_peft(b, args, data, n_mm):
    from peft import LoraConfig, get_peft_model

    _, ids, tgt, mask = data
    B, T, n = args.batch, args.seq, args.adapters
    model = G.build_causal_lm(qwen3_config(args), args.device, args.dtype, args.seed)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    cast = args.peft_fp32_adapters
    names = [f"p{i}" for i in range(n)]
    pm = get_peft_model(model, cfg, adapter_name=names[0], autocast_adapter_dtype=cast)
    for nm in names[1:]:
        pm.add_adapter(nm, cfg, autocast_adapter_dtype=cast)
    G.randomize_lora_B(pm.named_parameters(), tuple(f"lora_B.{nm}.weight" for nm in names), 0.01,
                       args.seed + 2, args.device)
    params = [p for nme, p in pm.named_parameters() if "lora_" in nme]
    backbone, head = pm.base_model.model.model, pm.base_model.model.lm_head

    def fwd_bwd(rows):
        h = backbone(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False).last_hidden_state
        loss = G.chunked_loss(h, head.weight, tgt[rows], args.chunk)
        loss.backward()
        return loss.detach()

    def tmux():
        total = 0.0
        for i, nm in enumerate(names):
            pm.set_adapter(nm)
            total = total + fwd_bwd(slice(i, i + 1))
        return total

    def single():
        pm.set_adapter(names[0])
        return fwd_bwd(slice(0, B))

    zero = lambda: G.zero_grads(params)  # noqa: E731
    b.run("peft_tmux", f"PEFT time-multiplexed, {n} adapters x 1 seq", tmux, tokens=n * T, flops=4 * n_mm * n * T,
          before=zero, adapters=n, batch=n)
    b.run("peft_1", f"PEFT, 1 adapter, batch {B}", single, tokens=B * T, flops=4 * n_mm * B * T, before=zero,
          adapters=1, batch=B)


# ----------------------------------------------------------------------------- main
def report(b, args):
    ok = b.ok
    n, m = args.adapters, args.many
    print("ratios (same step, same tokens unless stated):")
    r8, rt = ok("lf_8mix"), ok("peft_tmux")
    b.ratio("mixed_vs_tmux", f"lorafleet {n} mixed vs PEFT time-multiplexed, tokens/s",
            r8["tokens_per_s"] / rt["tokens_per_s"] if r8 and rt else None, target=(">=", 1.8),
            needs=("lf_8mix", "peft_tmux"))
    rb = ok("base")
    b.ratio("lora_overhead", f"LoRA overhead over frozen base, (lf_{n}mix - base) / base time",
            (r8["median_s"] - rb["median_s"]) / rb["median_s"] if r8 and rb else None, target=("<=", 0.10),
            fmt="{:+.1%}", needs=("lf_8mix", "base"))
    r1, r16 = ok("lf_1"), ok("lf_16mix")
    b.ratio("per_token_16_vs_1", f"per-token cost, {m} adapters (batch {m}) vs 1 adapter (batch {args.batch}), extra",
            (r1["tokens_per_s"] / r16["tokens_per_s"] - 1) if r1 and r16 else None, target=("<=", 0.05),
            fmt="{:+.1%}", needs=("lf_1", "lf_16mix"))
    p1 = ok("peft_1")
    b.ratio("lf1_vs_peft1", "lorafleet 1 adapter vs PEFT 1 adapter (batch 8), tokens/s",
            r1["tokens_per_s"] / p1["tokens_per_s"] if r1 and p1 else None, needs=("lf_1", "peft_1"))
    b.ratio("lf1_overhead", "LoRA overhead over frozen base, (lf_1 - base) / base time",
            (r1["median_s"] - rb["median_s"]) / rb["median_s"] if r1 and rb else None, fmt="{:+.1%}",
            needs=("lf_1", "base"))
    b.ratio("per_token_8_vs_1", f"per-token cost, {n} mixed vs 1 adapter (same batch), extra",
            (r1["tokens_per_s"] / r8["tokens_per_s"] - 1) if r1 and r8 else None, fmt="{:+.1%}",
            needs=("lf_1", "lf_8mix"))


def main(argv=None):
    args = parse_args(argv)
    n_mm = matmul_params(args)
    cfg = {
        "model": (f"Qwen3-8B shape, {args.layers} layers, hidden {args.hidden}, intermediate {args.inter}, "
                  f"heads {args.heads}/{args.kv_heads}kv x{args.head_dim}, vocab {args.vocab}, random init"),
        "N (MFU basis: 4*N*tokens)": f"{n_mm / 1e9:.4f}B matmul params (layers' linears + LM head)",
        "tokens": (f"T={args.seq} per sequence; batch {args.batch} ({args.batch * args.seq} tokens), "
                   f"{args.many} sequences in lf_16mix"),
        "LoRA": f"r={args.rank} alpha={args.alpha:g} on {','.join(TARGETS)}; B ~ N(0, 0.01)",
        "loss": f"chunked LM head ({args.chunk} rows fp32) + summed cross-entropy, every row",
        "PEFT adapters": "fp32 (autocast)" if args.peft_fp32_adapters else "base dtype (autocast_adapter_dtype=False)",
    }
    b = G.Bench("lorafleet GPU benchmark: dense (Qwen3-8B shape)", args, cfg)
    data = make_data(args, max(args.many, args.batch))
    b.system("lorafleet", [("base", "frozen base only"), ("lf_1", "lorafleet 1"), ("lf_8mix", "lorafleet mixed"),
                           ("lf_16mix", "lorafleet many")], run_base_and_fleet, b, args, data, n_mm)
    b.system("peft", [("peft_tmux", "PEFT time-multiplexed"), ("peft_1", "PEFT 1 adapter")],
             run_peft, b, args, data, n_mm)
    b.table()
    report(b, args)
    return b.finish()


if __name__ == "__main__":
    main()
