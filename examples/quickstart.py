"""Three adapters of different ranks in one mixed batch on a tiny MoE model, then export and
reload one with PEFT to show the files are standard.

    python examples/quickstart.py [--arch qwen3_moe] [--out out/quickstart]
"""

import argparse
import copy
import time

import torch
from peft import PeftModel

import lorafleet as lf
from lorafleet.models.debug import DEBUG_ARCHS, build_debug_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe", choices=DEBUG_ARCHS)
    ap.add_argument("--out", default="out/quickstart")
    args = ap.parse_args()

    model = build_debug_model(args.arch, seed=0)  # random-init, built in code: nothing downloaded
    base = copy.deepcopy(model)
    fleet = lf.Fleet(model, max_adapters=4, max_rank=16)
    fleet.add_adapter("chat", lf.AdapterConfig(rank=16, alpha=32, target_modules="all-linear", experts=True))
    fleet.add_adapter("math", lf.AdapterConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], experts=False))
    fleet.add_adapter("code", lf.AdapterConfig(rank=4, alpha=8, experts=True, expert_sharing="shared_outer"))

    # B starts at zero (a fresh adapter is the base model); nudge every factor so the demo shows effects
    g = torch.Generator().manual_seed(0)
    for name in fleet.adapters:
        w = fleet.get_adapter_weights(name)
        for _, t in w.tensors():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
        fleet.set_adapter_weights(name, w)

    ids = torch.randint(0, model.config.vocab_size, (5, 12), generator=g)
    rows = ["chat", "math", None, "code", "chat"]
    model.train()
    t0 = time.perf_counter()
    out = fleet.forward(ids, adapters=rows)
    out.logits.float().logsumexp(-1).mean().backward()
    dt = time.perf_counter() - t0
    print(f"{args.arch}: one forward+backward over rows {rows} in {dt * 1e3:.1f} ms")
    for name, cfg in fleet.adapters.items():
        s = fleet.slot_of(name)
        gn = sum(float(p.grad[s].norm() ** 2) for p in fleet.lora_parameters() if p.grad is not None) ** 0.5
        print(f"  {name:5s} slot {s} rank {cfg.rank:2d} experts={cfg.experts!s:5s} "
              f"sharing={cfg.expert_sharing:12s} grad norm {gn:.4f}")

    model.eval()
    fleet.save_adapter("chat", f"{args.out}/chat", format="peft")
    fleet.save_adapter("chat", f"{args.out}/chat_vllm", format="vllm")
    fleet.save_adapter("code", f"{args.out}/code_sglang", format="sglang")
    peft_model = PeftModel.from_pretrained(base, f"{args.out}/chat")
    with torch.no_grad():
        ours = fleet.forward(ids[:1], adapters=["chat"]).logits
        theirs = peft_model(input_ids=ids[:1]).logits
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"exported to {args.out}/ (peft, vllm, sglang); PEFT reload of 'chat': logits rel. err {err:.2e}")
    if err > 1e-5:
        raise SystemExit("PEFT reload disagrees with the fleet")


if __name__ == "__main__":
    main()
