"""Expert and data parallelism: bytes each rank communicates per optimizer step (the expert
all-to-all with its slot ids, the dense bank's reduction), and the expert-LoRA bank each rank
holds, by expert-sharing mode.

    .venv/bin/python bench/bench_expert_parallel.py            # tables at the Qwen3-30B-A3B shape
                                                               #   (+ the bank measured on a small fleet)
    .venv/bin/python bench/bench_expert_parallel.py --measure  # + a 2-rank gloo run checking the
                                                               #   payload model against real splits

The payload is counted, not timed (gloo on CPU says nothing about NCCL speed). Per MoE layer and
micro-batch of T tokens per rank, P = T * top_k (token, expert) pairs leave for their experts'
ranks: with uniform routing a fraction (ep - 1) / ep of them is remote. lorafleet's dispatch
sends, per pair, the hidden state out and the expert output back (forward), the same two in
backward, again the forward two on an activation-checkpoint recompute, plus one int32 slot id
per forward (and recompute) and E int64 counts. Alternatives for the same expert LoRA without
expert parallelism (the bank replicated on every data-parallel rank): a ring all-reduce of the
whole bank gradient every backward (DDP), an FSDP reduce-scatter of it every backward plus an
all-gather of the bank every forward, or lorafleet's dense rule (reduce each stepping slot once
per optimizer step) applied to the expert bank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from lorafleet.lora.experts import SHARED_FACTORS  # (gate_up A, gate_up B, down A, down B) per mode

# Qwen3-30B-A3B's MoE shape
SHAPE = dict(layers=48, experts=128, top_k=8, hidden=2048, inter=768)
ACT_BYTES = 2  # bf16 activations
BANK_BYTES = 2  # bf16 bank (fp32 masters and moments live per adapter, beside the views)
GRAD_BYTES = 4  # fp32 gradient reduction


def per_expert_numel(shape, rank) -> dict[str, int]:
    H, I2, I = shape["hidden"], 2 * shape["inter"], shape["inter"]
    return {"gate_up.A": rank * H, "gate_up.B": I2 * rank, "down.A": rank * I, "down.B": H * rank}




def slot_bank_bytes(shape, rank, mode, ep, stored_once: bool) -> int:
    """One slot's expert bank on one rank, all layers. Today every factor is allocated for every
    expert (``[S, E/ep, R, .]``) whatever the mode; ``stored_once``: a shared factor once per slot
    (replicated on every EP rank) and only the per-expert factors sliced."""
    E_local = shape["experts"] // ep
    total = 0
    for (key, n), shared in zip(per_expert_numel(shape, rank).items(), SHARED_FACTORS[mode]):
        total += n * (1 if (shared and stored_once) else E_local)
    return total * shape["layers"] * BANK_BYTES


def dispatch_bytes(shape, tokens, ep, checkpointing=True) -> dict[str, float]:
    """Bytes one rank sends per micro-batch, all MoE layers (uniform routing)."""
    L, P, H = shape["layers"], tokens * shape["top_k"], shape["hidden"]
    remote = (ep - 1) / ep
    fwd = 2 if checkpointing else 1  # forward, and its recompute in backward
    hidden = L * P * H * ACT_BYTES * remote * (2 * fwd + 2)  # out + back, forward(s) and backward
    slots = L * P * 4 * remote * fwd
    counts = L * shape["experts"] * 8 * remote * fwd
    return {"hidden": hidden, "slot_ids": slots, "counts": counts, "total": hidden + slots + counts}


def bank_reduce_bytes(bank_bytes_total: float, world: int, kind: str, micro_batches: int) -> float:
    """Bytes one rank sends to reduce a replicated expert bank (no EP), per optimizer step."""
    ring = (world - 1) / world
    grad = bank_bytes_total / BANK_BYTES * GRAD_BYTES
    if kind == "ddp":  # all-reduce = reduce-scatter + all-gather, every backward
        return 2 * ring * grad * micro_batches
    if kind == "fsdp":  # reduce-scatter every backward, all-gather of the bank every forward
        return ring * (grad + bank_bytes_total) * micro_batches
    if kind == "step":  # reduce each stepping slot once per optimizer step
        return 2 * ring * grad
    raise ValueError(kind)


def fmt(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:7.1f} {unit}"
        b /= 1000
    return ""


def comm_table(slots=16, rank=16, tokens=4096, micro_batches=4, world=8):
    shape = SHAPE
    bank = slots * slot_bank_bytes(shape, rank, "none", 1, stored_once=False)
    d = dispatch_bytes(shape, tokens, world)
    per_step = {k: v * micro_batches for k, v in d.items()}
    print(f"bytes sent per rank per optimizer step: Qwen3-30B-A3B MoE shape, {world} ranks, {slots} slots of "
          f"rank {rank} (per-expert LoRA, bank {fmt(bank)} in bf16), {micro_batches} micro-batches of {tokens} "
          "tokens per rank, activation checkpointing on")
    rows = [
        ("EP=8 all-to-all: hidden states (fwd, recompute, bwd)", per_step["hidden"]),
        ("EP=8 all-to-all: slot ids (int32 per pair)", per_step["slot_ids"]),
        ("EP=8 all-to-all: expert counts", per_step["counts"]),
        ("EP=8 total (per-expert grads need no reduction)", per_step["total"]),
        ("no EP, DDP all-reduce of the expert bank every backward", bank_reduce_bytes(bank, world, "ddp", micro_batches)),
        ("no EP, FSDP reduce-scatter + all-gather of the bank", bank_reduce_bytes(bank, world, "fsdp", micro_batches)),
        ("no EP, reduce stepping slots once per optimizer step", bank_reduce_bytes(bank, world, "step", micro_batches)),
    ]
    for name, b in rows:
        print(f"  {name:<60} {fmt(b)}")
    print(f"  slot ids add {d['slot_ids'] / d['hidden']:.3%} to the hidden-state payload "
          f"(4 bytes per pair vs {2 * ACT_BYTES * shape['hidden']} per forward exchange)")
    print("  (no EP also needs the whole bank on every rank: the memory table below, ep=1)\n")


# Qwen3-30B-A3B's attention linears (in, out): the dense LoRA bank every data-parallel rank holds
ATTN = dict(q_proj=(2048, 4096), k_proj=(2048, 512), v_proj=(2048, 512), o_proj=(4096, 2048))


def dense_slot_numel(rank: int, layers: int = SHAPE["layers"]) -> int:
    return layers * sum(rank * (i + o) for i, o in ATTN.values())


def dense_table(slots=16, rank=16, stepping=4, micro_batches=4, world=8):
    """The replicated dense bank: lorafleet SUM-reduces only the stepping slots' gradients, once
    per optimizer step (the gradient accumulates locally over micro-batches); DDP would all-reduce
    the whole bank every backward, FSDP reduce-scatter it every backward and all-gather it every
    forward."""
    ring = (world - 1) / world
    per_slot = dense_slot_numel(rank)
    bank = slots * per_slot
    rows = [
        (f"lorafleet: {stepping} stepping slots, once per optimizer step", 2 * ring * stepping * per_slot * GRAD_BYTES),
        ("DDP: all-reduce of the whole bank every backward", 2 * ring * bank * GRAD_BYTES * micro_batches),
        ("FSDP: reduce-scatter every backward + all-gather every forward",
         ring * bank * (GRAD_BYTES + BANK_BYTES) * micro_batches),
    ]
    print(f"dense LoRA bank (q/k/v/o of the same shape, {slots} slots of rank {rank}, {fmt(bank * BANK_BYTES)} in "
          f"bf16): bytes sent per rank per optimizer step, {world} data-parallel ranks, {stepping} of {slots} "
          f"adapters stepping, {micro_batches} micro-batches (forward_backward calls) per step")
    for name, b in rows:
        print(f"  {name:<66} {fmt(b)}  ({b / rows[0][1]:5.1f}x)")
    print()


# a scaled-down Qwen3-MoE (the 30B's hidden:inter ratio, 16 experts) whose fleet is really built
SMALL = dict(layers=2, experts=16, top_k=4, hidden=128, inter=48)


def measured_slot_bytes(shape, rank, mode, ep) -> int:
    """One slot's expert bank on EP rank 0, as `MultiLoRAExperts` really allocates it: a fleet on a
    debug Qwen3-MoE of ``shape`` with one adapter of ``mode``, every MoE layer narrowed to rank 0's
    ``E / ep`` experts with the same module call `apply_expert_parallel` makes (no process group)."""
    import torch

    import lorafleet as lf
    from lorafleet.models.debug import build_debug_model

    model = build_debug_model("qwen3_moe", seed=0, dtype=torch.bfloat16, num_hidden_layers=shape["layers"],
                              num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                              hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"])
    fleet = lf.Fleet(model, max_adapters=4, max_rank=rank)
    fleet.add_adapter("a", lf.AdapterConfig(rank=rank, target_modules=["q_proj"], experts=True, expert_sharing=mode))
    total = 0
    for m in fleet._att.experts.values():
        local = m.num_experts // ep
        m.narrow_experts(0, local, keep_shared_grad=True)
        total += m.bank_bytes()
    return total


def memory_table(rank=16):
    shape = SHAPE
    print(f"expert-LoRA bank per slot per rank (bf16, rank {rank}; fp32 AdamW moments and masters add 12 "
          "bytes per trained element beside it)\n  before: the old [S, E/ep, R, .] layout (formula); "
          "after: the row pools, a shared factor once per slot (30B: formula; small: measured)")
    print(f"  {'mode':<13}{'ep':>4}{'30B before':>14}{'30B after':>14}{'saved':>8}"
          f"{'small before':>15}{'small measured':>16}{'saved':>8}")
    for mode in SHARED_FACTORS:
        for ep in (1, 2, 8):
            today = slot_bank_bytes(shape, rank, mode, ep, stored_once=False)
            once = slot_bank_bytes(shape, rank, mode, ep, stored_once=True)
            small_before = slot_bank_bytes(SMALL, rank, mode, ep, stored_once=False)
            small = measured_slot_bytes(SMALL, rank, mode, ep)
            # the module's real allocation is the stored-once formula, byte for byte
            assert small == slot_bank_bytes(SMALL, rank, mode, ep, stored_once=True), (mode, ep, small)
            print(f"  {mode:<13}{ep:>4}{fmt(today):>14}{fmt(once):>14}{1 - once / today:>7.0%}"
                  f"{fmt(small_before):>15}{fmt(small):>16}{1 - small / small_before:>7.0%}")
    print(f"  ('small': a fleet really built on a debug Qwen3-MoE with {SMALL['layers']} layers, "
          f"{SMALL['experts']} experts, hidden {SMALL['hidden']}, inter {SMALL['inter']}; its bytes equal the "
          "30B formula's at that shape)\n")


def measure():
    """Two gloo ranks, debug Qwen3-MoE, EP=2: the splits the dispatcher really used vs the
    byte model's pair count (the model assumes nothing about routing here: real splits); then
    data parallelism on a debug Qwen3: the dense bytes the comm object really reduced."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_measure_worker, args=(2, os.path.join(d, "init")), nprocs=2, join=True)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_measure_dense_worker, args=(2, os.path.join(d, "init")), nprocs=2, join=True)


def _measure_dense_worker(rank, world, init_file):
    import torch
    import torch.distributed as dist

    import lorafleet as lf
    from lorafleet.distributed import ParallelismConfig, build_mesh, parallelize
    from lorafleet.models.debug import build_debug_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build_debug_model("qwen3", seed=0)
    fleet = lf.Fleet(model, max_adapters=4, max_rank=8)
    for i in range(4):
        fleet.add_adapter(f"a{i}", lf.AdapterConfig(rank=8, target_modules=list(ATTN), seed=i))
    comm = parallelize(fleet, build_mesh(ParallelismConfig(), device="cpu"))
    stepping = ["a0", "a1"]
    for _ in range(3):  # three micro-batches, one optimizer step
        fleet.forward_backward([lf.Example(n, input_tokens=[1, 5, 6, 7], target_tokens=[5, 6, 7, 2])
                                for n in stepping for _ in range(2)])
    fleet.optim_step()
    per_slot = sum(p[idx].numel() for _, p, idx in fleet.adapter_views("a0"))
    if rank == 0:
        print(f"dense, measured: {len(stepping)} of 4 slots stepped after 3 micro-batches: {comm.bytes_reduced} bytes "
              f"all-reduced = {comm.bytes_reduced // (4 * per_slot)} slots x {per_slot} fp32 elements "
              f"(the whole bank every backward would be {3 * 4 * per_slot * 4})", flush=True)
    dist.destroy_process_group()


def _measure_worker(rank, world, init_file):
    import torch
    import torch.distributed as dist

    import lorafleet as lf
    from lorafleet.distributed.expert_parallel import apply_expert_parallel
    from lorafleet.models.debug import build_debug_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build_debug_model("qwen3_moe", seed=0)
    fleet = lf.Fleet(model, max_adapters=3, max_rank=8)
    for i, mode in enumerate(SHARED_FACTORS):
        fleet.add_adapter(mode, lf.AdapterConfig(rank=8, experts=True, expert_sharing=mode, seed=i))
    apply_expert_parallel(fleet, dist.group.WORLD)
    T = 64
    ids = torch.randint(0, 256, (4, T // 4), generator=torch.Generator().manual_seed(rank))
    fleet.forward(ids, adapters=["none", "shared_a", "shared_outer", None]).logits.sum().backward()
    m0 = next(iter(fleet._att.experts.values()))
    H, K = m0.hidden_size, model.config.num_experts_per_tok
    sent = remote = 0
    for m in fleet._att.experts.values():
        send, _ = m.token_dispatcher.last_splits
        sent += sum(send)
        remote += sum(send) - send[rank]
    L = len(fleet._att.experts)
    per_pair = 4 * H * 4 + 4  # fp32 hidden out/back in forward and backward, + slot id
    line = (f"rank {rank}: {L} MoE layers x {T} tokens x top-{K} = {L * T * K} pairs ({sent} counted by the "
            f"dispatcher), {remote} remote -> {remote * per_pair} bytes of hidden states + slot ids sent "
            f"(+ {L * m0.num_experts * 8 * (world - 1) // world} of counts), no checkpointing")
    dist.barrier()
    for r in range(world):
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="also run the 2-rank gloo check")
    args = ap.parse_args(argv)
    comm_table()
    dense_table()
    memory_table()
    if args.measure:
        measure()


if __name__ == "__main__":
    sys.exit(main())
