"""LoRA on every architecture lorafleet was tried on, against PEFT: prints the table of
docs/architectures.md.

    OMP_NUM_THREADS=1 python bench/arch_parity.py            # every architecture
    OMP_NUM_THREADS=1 python bench/arch_parity.py jamba dbrx # some
    python bench/arch_parity.py --json out.json              # rows as JSON too

Per architecture (a tiny random model built in code, `lorafleet.models.tiny` / `.debug`): a
Fleet attaches by structure; adapter ``a`` (rank 4, every dense target, expert LoRA where the
experts attach) and ``b`` (rank 2, one target) are randomised and run in one mixed batch with a
base row, under activation checkpointing (``gradient_checkpointing_enable`` + train mode) where
the model supports it. The reference is PEFT built independently —
``get_peft_model(base, LoraConfig(target_modules=<the fleet's names>, target_parameters=
[<experts>.gate_up_proj, <experts>.down_proj]))`` — holding ``a``'s factors, in eval mode without
checkpointing. Reported: max relative error of ``a``'s logits and of every LoRA gradient, the
base row against the untouched model, and what attached. `tests/test_architectures.py` runs the
same function and asserts on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import lorafleet as lf  # noqa: E402
from lorafleet.models import arch_spec  # noqa: E402
from lorafleet.models.debug import DEBUG_ARCHS, build_debug_model  # noqa: E402
from lorafleet.models.tiny import TINY_ARCHS, UnavailableArchitecture, build_tiny_model  # noqa: E402

ALL_ARCHS = tuple(DEBUG_ARCHS) + tuple(TINY_ARCHS)
RANK, ALPHA = 4, 8


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def build(model_type: str):
    if model_type in DEBUG_ARCHS:
        return build_debug_model(model_type, seed=0)
    return build_tiny_model(model_type, seed=0)


def _randomize(fleet, name, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    w = fleet.get_adapter_weights(name)
    for _, t in w.tensors():
        t.copy_(torch.randn(t.shape, generator=g) * std)
    fleet.set_adapter_weights(name, w)


def _fleet_grads(fleet, name) -> dict[str, torch.Tensor]:
    saved = {}
    for p in fleet.lora_parameters():
        saved[p] = p.data.clone()
        p.data.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    try:
        return {k: t.clone() for k, t in fleet.get_adapter_weights(name).tensors()}
    finally:
        for p, d in saved.items():
            p.data.copy_(d)


def _peft_modules(peft_model):
    """{fleet key prefix: (kind, module)}: dense LoRA layers by module path, expert ParamWrappers
    by ``<experts path>.gate_up`` / ``.down``."""
    out = {}
    for name, m in peft_model.named_modules():
        if not hasattr(m, "lora_A") or "default" not in getattr(m, "lora_A", {}):
            continue
        path = name.removeprefix("base_model.model.")
        pname = getattr(m, "parameter_name", None)
        if pname is None:
            out[path] = ("dense", m)
        else:
            while path.endswith(".base_layer"):
                path = path[: -len(".base_layer")]
            out[f"{path}.{'gate_up' if pname in ('gate_up_proj', 'up_proj') else 'down'}"] = ("experts", m)
    return out


def _experts_to_peft(A, B):
    """lorafleet ``A [E, r, in]``, ``B [E, out, r]`` -> PEFT ParamWrapper ``lora_A [E*r, in]``
    (expert-slowest), ``lora_B [out, r*E]`` (expert-fastest)."""
    E, r, _ = A.shape
    return A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _experts_from_peft(gA, gB, E, r):
    return gA.reshape(E, r, -1), gB.reshape(gB.shape[0], r, E).permute(2, 0, 1)


def run_arch(model_type: str, checkpointing: bool = True) -> dict:
    """Build, attach, compare with PEFT; one row of the table (raises on a broken attach)."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model = build(model_type)
    base = copy.deepcopy(model)
    spec = arch_spec(model)
    lin_rel = sorted({n.split(".", len(spec.layers_path.split(".")) + 1)[-1] for n, m in model.named_modules()
                      if n.startswith(spec.layers_path + ".") and isinstance(m, torch.nn.Linear)})
    fleet = lf.Fleet(model, max_adapters=3, max_rank=RANK)  # expert LoRA where the experts are supported
    experts_ok = fleet.expert_lora
    names = list(fleet.linear_names)
    att = fleet._att
    row = dict(arch=model_type, cls=type(model).__name__, layers=spec.layers_path, dense=names,
               experts=sorted({p.split(".", len(spec.layers_path.split(".")) + 1)[-1] for p in att.experts}),
               experts_refused=[f"{p}: {why}" for p, why in spec.experts_problems][:1],
               routers=list(spec.router_linears), excluded=[n for n, _ in spec.excluded_linears],
               notes=spec.notes, all_linears=lin_rel)

    # PEFT reference first: which of the names does PEFT put LoRA on exactly where the fleet does?
    rel_layer = lambda p: p[len(spec.layers_path) + 1:].split(".", 1)[1]  # noqa: E731
    expert_params = sorted({f"{rel_layer(p)}.{m.up_name}" for p, m in att.experts.items()}
                           | {f"{rel_layer(p)}.down_proj" for p in att.experts})
    want = {p for p, m in att.linears.items() if m.short_name in names}

    def peft_for(targets):
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0,
                         target_parameters=expert_params or None)
        return get_peft_model(copy.deepcopy(base), cfg)

    ref = peft_for(names)
    mods = _peft_modules(ref)
    got_dense = {k for k, (kind, _) in mods.items() if kind == "dense"}
    remapped = sorted({p.rsplit(".", 1)[-1] for p in want - got_dense}
                      | {p.rsplit(".", 1)[-1] for p in got_dense - want})
    if remapped:  # PEFT re-targets these names (v5 MoE conversion): compare on the others
        names = [n for n in names if n not in remapped]
        ref = peft_for(names)
        mods = _peft_modules(ref)
        want = {p for p, m in att.linears.items() if m.short_name in names}
    row["peft_remapped"] = remapped

    fleet.add_adapter("a", lf.AdapterConfig(rank=RANK, alpha=ALPHA, target_modules=names,
                                            experts=experts_ok, seed=1))
    fleet.add_adapter("b", lf.AdapterConfig(rank=2, alpha=4, target_modules=names[:1], experts=False, seed=2))
    _randomize(fleet, "a", 11)
    _randomize(fleet, "b", 12)
    w = fleet.get_adapter_weights("a")
    with torch.no_grad():
        for path, (A, B) in w.dense.items():
            m = mods[path][1]
            m.lora_A["default"].weight.copy_(A)
            m.lora_B["default"].weight.copy_(B)
        for path, projs in w.experts.items():
            for proj, (A, B) in projs.items():
                m = mods[f"{path}.{proj}"][1]
                pa, pb = _experts_to_peft(A, B)
                m.lora_A["default"].weight.copy_(pa)
                m.lora_B["default"].weight.copy_(pb)
    missing = (set(w.dense) ^ {k for k, (kind, _) in mods.items() if kind == "dense"}) | (
        {f"{p}.{pr}" for p, d in w.experts.items() for pr in d} ^ {k for k, (kind, _) in mods.items() if kind == "experts"})
    assert not missing, f"{model_type}: fleet and PEFT target different modules: {sorted(missing)[:6]}"

    rows = ["a", None, "b"]
    B_, T = len(rows), 8
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (B_, T), generator=g)
    mask = torch.ones(B_, T, dtype=torch.long)
    mask[2, 6:] = 0
    proj = torch.randn(B_, T, model.config.vocab_size, generator=g)
    ckpt = checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if ckpt:
        model.gradient_checkpointing_enable()
        model.train()
    logits = fleet.forward(ids, attention_mask=mask, adapters=rows).logits
    (logits * proj).sum().backward()
    model.eval()
    row["checkpointing"] = bool(ckpt)

    with torch.no_grad():
        base_logits = base(input_ids=ids[1:2], attention_mask=mask[1:2]).logits
    row["base_row_err"] = rel(logits[1:2].detach(), base_logits)
    ref.eval()
    ref_logits = ref(input_ids=ids[0:1], attention_mask=mask[0:1]).logits
    (ref_logits * proj[0:1]).sum().backward()
    row["logits_err"] = rel(logits[0:1].detach(), ref_logits.detach())
    with torch.no_grad():
        row["effect"] = rel(base(input_ids=ids[0:1], attention_mask=mask[0:1]).logits, ref_logits.detach())

    ours = _fleet_grads(fleet, "a")
    theirs = {}
    for path in w.dense:
        m = mods[path][1]
        theirs[f"{path}.A"] = m.lora_A["default"].weight.grad
        theirs[f"{path}.B"] = m.lora_B["default"].weight.grad
    for path, projs in w.experts.items():
        E = att.experts[path].num_experts
        for pr in projs:
            m = mods[f"{path}.{pr}"][1]
            gA, gB = _experts_from_peft(m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad, E, RANK)
            theirs[f"{path}.{pr}.A"], theirs[f"{path}.{pr}.B"] = gA, gB
    assert set(ours) == set(theirs), f"{model_type}: gradient keys differ"
    errs = {k: rel(ours[k], theirs[k]) for k in ours if theirs[k] is not None}
    row["grad_err"] = max(errs.values()) if errs else float("nan")
    row["worst_grad"] = max(errs, key=errs.get) if errs else ""
    # every factor of `a` got a gradient: no targeted projection is bypassed (read via .weight)
    row["no_grad"] = sorted(k for k, t in ours.items() if k.endswith(".B") and float(t.abs().sum()) == 0.0)
    row["max_err"] = max(row["logits_err"], row["grad_err"])
    row["seconds"] = time.perf_counter() - t0
    fleet.detach()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model_type | class | layers | dense targets | expert LoRA | not targeted (routers, gates) | "
             "max rel. err vs PEFT (logits, grads) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | | | | | | {r['error']} |")
            continue
        dense = ", ".join(f"`{n}`" for n in r["dense"])
        if r.get("peft_remapped"):
            dense += f" (compared without {', '.join(r['peft_remapped'])}: PEFT re-targets them)"
        if r["experts"]:
            experts = "yes: " + ", ".join(f"`{e}`" for e in r["experts"])
        elif r["experts_refused"]:
            experts = "refused (dense only)"
        else:
            experts = "-"
        routers = ", ".join([f"`{n}`" for n in r["routers"]]
                            + [f"`{n}` (read through `.weight`)" for n in r.get("excluded", [])]) or "-"
        err = f"{r['logits_err']:.1e}, {r['grad_err']:.1e}"
        lines.append(f"| {r['arch']} | {r['cls']} | `{r['layers']}` | {dense} | {experts} | {routers} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archs", nargs="*", default=list(ALL_ARCHS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    import peft

    rows = []
    for a in args.archs:
        try:
            rows.append(run_arch(a, checkpointing=not args.no_checkpointing))
        except UnavailableArchitecture as e:
            rows.append(dict(arch=a, error=f"skipped: {e}"))
        except Exception as e:  # noqa: BLE001 - a row per architecture, whatever happened
            rows.append(dict(arch=a, error=f"{type(e).__name__}: {str(e)[:200]}"))
        print(f"# {a}: {rows[-1].get('error') or 'max err %.1e (%.1fs)' % (rows[-1]['max_err'], rows[-1]['seconds'])}",
              file=sys.stderr, flush=True)
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
          f"float32 CPU, activation checkpointing {'off' if args.no_checkpointing else 'on'}\n")
    print(table(rows))
    refused = [r for r in rows if r.get("experts_refused")]
    if refused:
        print("\nexperts refused:")
        for r in refused:
            print(f"- {r['arch']}: {r['experts_refused'][0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    bad = [r["arch"] for r in rows if "error" in r and not r["error"].startswith("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
