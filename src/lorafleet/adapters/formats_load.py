"""Reading adapter directories (implementation of :func:`lorafleet.adapters.formats.load_adapter_dir`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..config import EXPERT_SHARING_MODES, AdapterConfig
from .formats_layouts import (
    CONFIG_FILE, META_FILE, MIXTRAL_NAMES, PARAM_OF_PROJ, PREFIX, PROJ_OF_PARAM, PROJS,
    SGLANG_STACKS, SHARED_FACTORS, VLLM_NAMES, WEIGHTS_FILE, AdapterFormatError, fuse_gate_up, peft_read,
    proj_dims, sglang_read,
)
from .formats_peft_config import check_config, not_a_target, pattern_value, peft_layer_index, unsupported_parameter
from .weights import AdapterWeights, ExpertsArch

_KEY_RE = re.compile(r"^(.*)\.lora_([AB])\.weight$")
_EMB_KEY_RE = re.compile(r"^(.*)\.lora_embedding_([AB])$")  # PEFT lora.Embedding: no ".weight"
_BASE_KEY_RE = re.compile(r"^(.*)\.base_layer\.weight$")  # PEFT's save_embedding_layers copies
_PER_EXPERT_RE = re.compile(r"^(.*experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)$")
_SGLANG_RE = re.compile(r"^(.*experts)\.(gate_up_proj|down_proj)$")


def _read_json(file: Path, required: bool) -> dict | None:
    if not file.exists():
        if required:
            raise AdapterFormatError(f"{file}: missing ({file.name} is required in an adapter directory)")
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{file}: unreadable or invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        bin_file = file.with_name("adapter_model.bin")
        extra = f" ({bin_file.name} found: pickled weights are not supported, convert to safetensors)" \
            if bin_file.exists() else ""
        raise AdapterFormatError(f"{file}: missing{extra}")
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise AdapterFormatError(f"{file}: unreadable or corrupt safetensors file ({exc})") from exc


def load_dir(path, experts_arch: dict[str, ExpertsArch] | None, model_type: str,
             linear_shapes: dict[str, tuple[int, int]] | None = None,
             embedding_shapes: dict[str, tuple[int, int]] | None = None) -> AdapterWeights:
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError(f"{root}: not an adapter directory (missing or not a directory)")
    cfg_file = root / CONFIG_FILE
    cfg = _read_json(cfg_file, required=True)
    meta = _read_json(root / META_FILE, required=False) or {}
    r, alpha, rslora, version, tps, rank_pat, alpha_pat = check_config(cfg, cfg_file)
    raw = _load_tensors(root / WEIGHTS_FILE)
    model_type = model_type or str(meta.get("model_type") or "")
    archs = dict(experts_arch or {})
    legacy = bool(re.match(r"^0\.1[78]\.", version))

    def strip(stem):
        return stem[len(PREFIX):] if stem.startswith(PREFIX) else stem

    # pair keys: stem -> {"A": t, "B": t}; embeddings (lora_embedding_A/B) apart
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    emb_pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_layers: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if m := _KEY_RE.match(key):
            pairs.setdefault(strip(m.group(1)), {})[m.group(2)] = t
        elif m := _EMB_KEY_RE.match(key):
            emb_pairs.setdefault(strip(m.group(1)), {})[m.group(2)] = t
        elif m := _BASE_KEY_RE.match(key):
            base_layers[strip(m.group(1))] = t
        else:
            raise AdapterFormatError(f"{root / WEIGHTS_FILE}: unsupported key {key!r} (expected ...lora_A.weight / "
                                     "...lora_B.weight, or ...lora_embedding_A / ...lora_embedding_B)")
    for stems, fmt in ((pairs, "{}.lora_{}.weight"), (emb_pairs, "{}.lora_embedding_{}")):
        for stem, ab in stems.items():
            if len(ab) != 2:
                have, miss = ("A", "B") if "A" in ab else ("B", "A")
                raise AdapterFormatError(f"{root / WEIGHTS_FILE}: key {fmt.format(stem, have)} has no "
                                         f"partner ({fmt.format(stem, miss)} missing)")
    both = sorted(set(pairs) & set(emb_pairs))
    if both:
        raise AdapterFormatError(f"{root / WEIGHTS_FILE}: module {both[0]!r} has both linear and embedding LoRA keys")
    if emb_pairs and cfg.get("ensure_weight_tying"):
        raise AdapterFormatError(
            f"{cfg_file}: field 'ensure_weight_tying' is true: PEFT then ties the lm_head LoRA to the embedding "
            "LoRA (one shared pair, lm_head A = embedding B.T); lorafleet trains LoRA on embed_tokens and lm_head "
            "as separate deltas (PEFT's default), so it cannot continue that adapter exactly")

    # lorafleet's own sglang export only: a PEFT file (no lorafleet.json) keeps every module it
    # names, even an all-zero one (e.g. the gradient of a module whose scale is 0)
    if meta.get("format") == "sglang":
        pairs = _without_zero_stack_partners(pairs)
    tp_parts = [(t.rpartition(".")[0], t.rpartition(".")[2]) for t in tps]
    for tp, (mp, pname) in zip(tps, tp_parts):
        if pname not in PROJ_OF_PARAM:
            raise unsupported_parameter(cfg_file, tp, mp, pname, pairs, archs)

    def arch_for(p, key):
        a = archs.get(p)
        if a is None:
            raise AdapterFormatError(f"{key}: experts_arch has no entry for experts module {p!r} "
                                     "(needed for num_experts / hidden / intermediate sizes)")
        return a

    def key_matches(pat, key):
        return pattern_value(pat, key, None) is not None

    def module_rank(key):  # PEFT's rank of one module (rank_pattern), checked against the tensors
        rm = pattern_value(rank_pat, key, r)
        return rm, f"r={rm}" + (" (from rank_pattern)" if key_matches(rank_pat, key) else "")

    def module_scale(key, rm):
        am = float(pattern_value(alpha_pat, key, alpha))
        return am / (math.sqrt(rm) if rslora else rm)

    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    scales: dict[object, float] = {}  # dense path | (experts path, proj) -> PEFT's scale of that module
    shared_dims: dict[str, set] = {}
    per_expert: dict[str, dict[int, dict[str, dict[str, torch.Tensor]]]] = {}
    sglang: dict[str, dict[str, torch.Tensor]] = {}
    found_arch: dict[str, ExpertsArch] = {}

    def add_expert(p, proj, ab, key):
        if proj in experts.setdefault(p, {}):
            raise AdapterFormatError(f"{key}: experts {p!r} {proj} LoRA given twice (in two layouts)")
        experts[p][proj] = ab

    for stem, ab in pairs.items():
        key = f"{PREFIX}{stem}.lora_A.weight"
        base = stem
        depth = 0
        while base.endswith(".base_layer"):
            base, depth = base[: -len(".base_layer")], depth + 1
        named = {pn for mp, pn in tp_parts if mp and (base == mp or base.endswith("." + mp))}
        bare = {pn for mp, pn in tp_parts if not mp}  # target_parameters without a module part
        params = sorted(named | bare, key=lambda pn: PROJS.index(PROJ_OF_PARAM[pn]))
        if params and (named or depth or base in archs):
            if depth >= len(params):
                raise AdapterFormatError(f"{key}: {depth} '.base_layer' levels but only {len(params)} "
                                         f"target_parameters match {base!r}")
            param = params[len(params) - 1 - depth]
            proj = PROJ_OF_PARAM[param]
            arch = arch_for(base, key)
            rm, _ = module_rank(f"{base}.{param}")
            add_expert(base, proj, peft_read(key, ab["A"], ab["B"], proj, arch, rm, legacy, version), key)
            scales[(base, proj)] = module_scale(f"{base}.{param}", rm)
            found_arch[base] = arch
        elif depth:
            raise AdapterFormatError(f"{key}: '.base_layer' key but adapter_config.json has no matching "
                                     "target_parameters")
        elif m := _PER_EXPERT_RE.match(stem):
            per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = ab
        elif (m := _SGLANG_RE.match(stem)) and ab["A"].dim() == 3:
            sglang.setdefault(m.group(1), {}).update(
                {f"{stem}.lora_A.weight": ab["A"], f"{stem}.lora_B.weight": ab["B"]})
        else:
            a, b = ab["A"], ab["B"]
            rm, rdesc = module_rank(stem)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rm or b.shape[1] != rm:
                raise AdapterFormatError(f"{key}: lora_A {list(a.shape)} / lora_B {list(b.shape)} disagree "
                                         f"with {rdesc} (expected lora_A [r, in], lora_B [out, r])")
            dense[stem] = (a, b)
            scales[stem] = module_scale(stem, rm)

    # per-expert 2D and SGLang files come from engines that use one rank: no patterns there
    for pat_name, pat in (("rank_pattern", rank_pat), ("alpha_pattern", alpha_pat)):
        hit = next((f"{st}" for st in pairs if (_PER_EXPERT_RE.match(st) or st in {
            f"{p}.{n}" for p in sglang for n in PARAM_OF_PROJ.values()}) and key_matches(pat, st)), None)
        if hit:
            raise AdapterFormatError(f"{cfg_file}: field {pat_name!r} matches {hit!r}: per-module ranks / "
                                     "alphas are supported for dense modules and PEFT target_parameters only, "
                                     "not in per-expert (vLLM) or SGLang 3D layouts")

    s0 = alpha / (math.sqrt(r) if rslora else r)
    for p, ts in sglang.items():
        arch = arch_for(p, f"{PREFIX}{p}.gate_up_proj.lora_A.weight")
        if arch.interleaved_gate_up:
            raise AdapterFormatError(f"{p}: SGLang 3D experts LoRA on interleaved gate/up rows (GPT-OSS) "
                                     "is not supported (layout unverified)")
        projs, shared = sglang_read(p, ts, arch, r)
        for proj, ab in projs.items():
            add_expert(p, proj, ab, f"{PREFIX}{p}.{PARAM_OF_PROJ[proj]}.lora_A.weight")
            scales[(p, proj)] = s0
        shared_dims[p] = {(pr, f) for pr, f in shared}
        found_arch[p] = arch

    for pfile, by_e in per_expert.items():
        p, arch, projs = _read_per_expert(pfile, by_e, archs, r, model_type)
        for proj, ab in projs.items():
            add_expert(p, proj, ab, f"{PREFIX}{pfile}.0")
            scales[(p, proj)] = s0
        found_arch[p] = arch

    if linear_shapes is not None:
        for stem, (a, b) in dense.items():
            if stem not in linear_shapes:
                raise not_a_target(root / WEIGHTS_FILE, stem, b.shape[0], archs, linear_shapes)

    # embeddings: PEFT lora.Embedding, A [r, V], B [D, r]; padded / scaled like a dense module
    for stem, ab in emb_pairs.items():
        a, b = ab["A"], ab["B"]
        key = f"{PREFIX}{stem}.lora_embedding_A"
        if embedding_shapes is not None and stem not in embedding_shapes:
            raise AdapterFormatError(f"{root / WEIGHTS_FILE}: {key}: no input embedding {stem!r} in this base model "
                                     f"(it has {sorted(embedding_shapes) or 'none'})")
        rm, rdesc = module_rank(stem)
        want = embedding_shapes.get(stem) if embedding_shapes is not None else None
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rm or b.shape[1] != rm or (
                want is not None and (a.shape[1], b.shape[0]) != want):
            raise AdapterFormatError(
                f"{key}: lora_embedding_A {list(a.shape)} / lora_embedding_B {list(b.shape)} disagree with {rdesc}"
                + (f" and the base embedding ({want[0]} tokens x {want[1]})" if want else "")
                + " (expected lora_embedding_A [r, vocab], lora_embedding_B [dim, r])")
        dense[stem] = (a, b)
        scales[stem] = module_scale(stem, rm)
    for stem in base_layers:
        if stem not in dense:
            raise AdapterFormatError(f"{root / WEIGHTS_FILE}: unsupported key {PREFIX}{stem}.base_layer.weight "
                                     "(a saved base weight of a module without LoRA in this file)")

    w = _finish(cfg, meta, r, alpha, rslora, dense, experts, scales, shared_dims, found_arch, model_type,
                sglang_only=bool(sglang) and not per_expert, file=root / META_FILE,
                linear_shapes=linear_shapes, archs=archs)
    w.embeddings = {stem: w.dense.pop(stem) for stem in emb_pairs}
    w.base_layers = base_layers
    return w


def _without_zero_stack_partners(pairs: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """``pairs`` less the all-zero dense q/k/v, gate/up LoRA that lorafleet's ``sglang`` export
    adds beside a targeted group member (SGLang stacks those groups), so a round trip keeps the
    adapter's target modules. A module name goes only if every pair of it is zero and has a kept
    group member beside it; dropping a zero pair is exact (it has zero gradients as well)."""
    def parts(stem):
        parent, _, leaf = stem.rpartition(".")
        return parent, leaf, next((g for g in SGLANG_STACKS if leaf in g), None)

    def zero(ab):
        return ab["A"].dim() == 2 and ab["B"].dim() == 2 and not ab["A"].any() and not ab["B"].any()

    by_leaf: dict[str, list[str]] = {}
    for stem, ab in pairs.items():
        parent, leaf, group = parts(stem)
        if group is not None:
            by_leaf.setdefault(leaf, []).append(stem)
    zero_leaves = {leaf for leaf, stems in by_leaf.items() if all(zero(pairs[st]) for st in stems)}
    kept_leaves = set(by_leaf) - zero_leaves

    def beside_a_kept_member(stem):
        parent, _, group = parts(stem)
        return any(f"{parent}.{n}" in pairs for n in group if n in kept_leaves)

    drop = {leaf for leaf in zero_leaves if all(beside_a_kept_member(st) for st in by_leaf[leaf])}
    return {stem: ab for stem, ab in pairs.items() if parts(stem)[1] not in drop}


def _read_per_expert(pfile, by_e, archs, r, model_type):
    mixtral_names = any(n in MIXTRAL_NAMES for d in by_e.values() for n in d)
    gate, up, down = MIXTRAL_NAMES if mixtral_names else VLLM_NAMES
    p = pfile
    if mixtral_names and pfile not in archs:
        p = re.sub(r"\.block_sparse_moe\.experts$", ".mlp.experts", pfile)
    num_e = max(by_e) + 1
    for e in range(num_e):
        for n in (gate, up, down):
            if n not in by_e.get(e, {}):
                raise AdapterFormatError(f"{PREFIX}{pfile}.{e}.{n}.lora_A.weight: missing (every expert "
                                         f"0..{num_e - 1} needs {gate}, {up} and {down})")
        extra = set(by_e[e]) - {gate, up, down}
        if extra:
            raise AdapterFormatError(f"{PREFIX}{pfile}.{e}: mixes projection names {sorted(by_e[e])}")
    stack = {n: (torch.stack([by_e[e][n]["A"] for e in range(num_e)]),
                 torch.stack([by_e[e][n]["B"] for e in range(num_e)]))
             for n in (gate, up, down)
             if all(by_e[e][n]["A"].dim() == 2 and by_e[e][n]["B"].dim() == 2 for e in range(num_e))
             and len({tuple(by_e[e][n]["A"].shape) for e in range(num_e)}) == 1
             and len({tuple(by_e[e][n]["B"].shape) for e in range(num_e)}) == 1}
    if len(stack) != 3:
        raise AdapterFormatError(f"{PREFIX}{pfile}: per-expert LoRA tensors must be 2D with the same shape "
                                 "for every expert")
    (ga, gb), (ua, ub), (da, db) = stack[gate], stack[up], stack[down]
    hid, inter = ga.shape[2], gb.shape[1]
    arch = archs.get(p) or ExpertsArch(num_e, hid, inter, model_type == "gpt_oss")
    want = {gate: ((r, arch.hidden_size), (arch.intermediate_size, r)),
            up: ((r, arch.hidden_size), (arch.intermediate_size, r)),
            down: ((r, arch.intermediate_size), (arch.hidden_size, r))}
    for n, (sa, sb) in want.items():
        a, b = stack[n]
        if tuple(a.shape[1:]) != sa or tuple(b.shape[1:]) != sb or num_e != arch.num_experts:
            raise AdapterFormatError(
                f"{PREFIX}{pfile}.{{e}}.{n}: lora_A {list(a.shape[1:])} / lora_B {list(b.shape[1:])} for "
                f"{num_e} experts disagree with r={r}, E={arch.num_experts}, H={arch.hidden_size}, "
                f"I={arch.intermediate_size} (expected lora_A {list(sa)}, lora_B {list(sb)})")
    gu = fuse_gate_up(ga, gb, ua, ub, arch.interleaved_gate_up)
    return p, arch, {"gate_up": gu, "down": (da, db)}


def _finish(cfg, meta, r, alpha, rslora, dense, experts, scales, shared_dims, found_arch, model_type,
            sglang_only, file, linear_shapes=None, archs=None) -> AdapterWeights:
    """One slot rank for the whole adapter, every update unchanged: modules of lower rank
    (rank_pattern, or every module but an unfused gate/up of rank 2r) are zero-padded; the most
    common PEFT scale (alpha_m / r_m) is the adapter's, and a module with another one keeps it as an
    ``alpha_pattern`` entry, so outputs and gradients are PEFT's."""
    s0 = alpha / (math.sqrt(r) if rslora else r)
    groups: list[list] = []  # [scale, count], equal scales (to rounding) grouped
    for sc in scales.values():
        g = next((g for g in groups if math.isclose(g[0], sc, rel_tol=1e-12)), None)
        if g is None:
            groups.append([sc, 1])
        else:
            g[1] += 1
    best = max((g[1] for g in groups), default=0)
    top = [g[0] for g in groups if g[1] == best]
    s_ref = next((sc for sc in top if math.isclose(sc, s0, rel_tol=1e-12)), top[0] if top else s0)
    # a module whose PEFT scale is not the adapter's keeps it exactly: an alpha_pattern entry (its
    # escaped full key, at the adapter's one slot rank) that the fleet reads as that module's scale
    odd: dict[str, float] = {}
    for key, sc in scales.items():
        if not math.isclose(sc, s_ref, rel_tol=1e-12):
            odd[key if isinstance(key, str) else f"{key[0]}.{PARAM_OF_PROJ[key[1]]}"] = sc
    for key, sc in list(odd.items()) + [("the adapter (lora_alpha)", s_ref)]:
        if not math.isfinite(float(torch.tensor(sc, dtype=torch.float32))):
            raise AdapterFormatError(f"{file.parent}: module {key}: its LoRA scale {sc:g} (rank_pattern / "
                                     "alpha_pattern) is not finite in float32")
    ranks = [a.shape[0] for a, _ in dense.values()] + [ab[0].shape[1] for d in experts.values() for ab in d.values()]
    big_r = max([r] + ranks)
    if not math.isclose(s_ref, s0, rel_tol=1e-12):
        alpha = s_ref * (math.sqrt(big_r) if rslora else big_r)
    elif big_r != r:
        alpha = alpha * (math.sqrt(big_r / r) if rslora else big_r / r)

    def pad(a, b, dim_a, dim_b):
        k = big_r - a.shape[dim_a]
        if k == 0:
            return a, b
        za = list(a.shape)
        za[dim_a] = k
        zb = list(b.shape)
        zb[dim_b] = k
        return torch.cat([a, a.new_zeros(za)], dim_a), torch.cat([b, b.new_zeros(zb)], dim_b)

    dense = {p: pad(a, b, 0, 1) for p, (a, b) in dense.items()}
    experts = {p: {pr: pad(a, b, 1, 2) for pr, (a, b) in d.items()} for p, d in experts.items()}
    layers = _native_layers(cfg, dense, experts, linear_shapes)
    if linear_shapes is not None:
        _complete(dense, experts, found_arch, big_r, linear_shapes, archs or {}, layers, cfg.get("layers_pattern"))

    mode = meta.get("expert_sharing")
    if mode is None and sglang_only and shared_dims:
        kinds = {frozenset(s) for s in shared_dims.values()}
        only = next(iter(kinds)) if len(kinds) == 1 else None
        mode = next((m for m, fs in SHARED_FACTORS.items() if only is not None and fs == only), "none")
    mode = mode or "none"
    if mode not in EXPERT_SHARING_MODES:
        raise AdapterFormatError(f"{file}: field 'expert_sharing' is {mode!r}; expected one of {EXPERT_SHARING_MODES}")
    if not experts:
        mode = str(meta.get("expert_sharing") or "none")
    for p, d in experts.items():
        for proj, (a, b) in list(d.items()):
            fac = {"A": a, "B": b}
            for f in ("A", "B"):
                if (proj, f) in SHARED_FACTORS[mode]:
                    t = fac[f]
                    if not all(torch.equal(t[0], t[e]) for e in range(1, t.shape[0])):
                        raise AdapterFormatError(
                            f"{file}: expert_sharing {mode!r} but experts {p!r} {proj} {f} differs "
                            "between experts")
                    fac[f] = t[:1].contiguous()
            d[proj] = (fac["A"], fac["B"])

    targets = tuple(sorted({p.rsplit(".", 1)[-1] for p in dense}))
    f_r = math.sqrt(big_r) if rslora else big_r
    alpha_pattern = {re.escape(k): sc * f_r for k, sc in sorted(odd.items())} or None
    config = AdapterConfig(rank=big_r, alpha=alpha, target_modules=targets, experts=bool(experts),
                           expert_sharing=mode, use_rslora=rslora, lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                           layers_to_transform=layers, alpha_pattern=alpha_pattern)
    return AdapterWeights(config=config, dense=dense, experts=experts, model_type=model_type,
                          base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
                          experts_arch={p: found_arch[p] for p in experts})


def _native_layers(cfg, dense, experts, linear_shapes) -> tuple[int, ...] | None:
    """The file's ``layers_to_transform`` as the adapter's own restriction, where every module the
    file holds lies in those layers (PEFT does not restrict ``target_parameters`` by it: a file with
    experts LoRA in other layers keeps the unrestricted, zero-filled form). Indices the base does
    not have are dropped (PEFT matches nothing there)."""
    lt = cfg.get("layers_to_transform")
    if lt is None or lt == []:
        return None
    lt = {lt} if isinstance(lt, int) else set(lt)
    pattern = cfg.get("layers_pattern")
    if any(peft_layer_index(p, pattern) not in lt for p in list(dense) + list(experts)):
        return None
    if linear_shapes is not None:
        lt &= {peft_layer_index(p, pattern) for p in linear_shapes}
    return tuple(sorted(lt)) or None


def _complete(dense, experts, found_arch, rank, linear_shapes, archs, layers=None, pattern=None) -> None:
    """Zero LoRA (A = B = 0) for the base's modules the file leaves out (``layers_to_transform``, a
    regex ``target_modules``, one experts projection only): the fleet gives an adapter every linear
    of its target names and every experts module. A zero pair has zero gradients, so it stays zero
    under training too: exact for outputs and for continued training, as in PEFT."""
    ref = next((a for a, _ in dense.values()), None)
    if ref is None:
        ref = next((ab[0] for d in experts.values() for ab in d.values()), None)
    if ref is None:
        return
    short = {p.rsplit(".", 1)[-1] for p in dense}
    def kept(p):  # the adapter's own layers_to_transform: nothing outside is filled
        return layers is None or peft_layer_index(p, pattern) in layers

    for p, (fin, fout) in linear_shapes.items():
        if p not in dense and p.rsplit(".", 1)[-1] in short and kept(p):
            dense[p] = (ref.new_zeros(rank, fin), ref.new_zeros(fout, rank))
    if not experts:
        return
    for p, arch in archs.items():
        if not kept(p):
            continue
        d = experts.setdefault(p, {})
        found_arch.setdefault(p, arch)
        for proj in PROJS:
            if proj not in d:
                fin, fout = proj_dims(proj, arch)
                d[proj] = (ref.new_zeros(arch.num_experts, rank, fin), ref.new_zeros(arch.num_experts, fout, rank))
