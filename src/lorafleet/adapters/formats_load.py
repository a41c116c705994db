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
    SHARED_FACTORS, VLLM_NAMES, WEIGHTS_FILE, AdapterFormatError, fuse_gate_up, peft_read,
    sglang_read,
)
from .weights import AdapterWeights, ExpertsArch

_KEY_RE = re.compile(r"^(.*)\.lora_([AB])\.weight$")
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


def _check_config(cfg: dict, file: Path) -> tuple[int, float, bool, str, list[str]]:
    def bad(field, why):
        return AdapterFormatError(f"{file}: field {field!r} {why}")

    if cfg.get("peft_type") != "LORA":
        raise bad("peft_type", f"is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    if cfg.get("use_dora"):
        raise bad("use_dora", "is true; DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise bad("bias", f"is {cfg.get('bias')!r}; only 'none' is supported")
    if cfg.get("lora_bias"):
        raise bad("lora_bias", "is true; LoRA biases are not supported")
    if cfg.get("modules_to_save"):
        raise bad("modules_to_save", f"is {cfg.get('modules_to_save')!r}; fully trained modules are not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise bad(field, f"is {cfg.get(field)!r}; per-module ranks / alphas are not supported (one rank per adapter)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", f"is {r!r}; expected a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad("lora_alpha", f"is {alpha!r}; expected a finite number")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad("use_rslora", f"is {rslora!r}; expected true or false")
    version = cfg.get("peft_version") or ""
    tps = cfg.get("target_parameters") or []
    if not isinstance(tps, list) or not all(isinstance(t, str) for t in tps):
        raise bad("target_parameters", f"is {tps!r}; expected a list of parameter names")
    if tps and re.match(r"^0\.19\.0(\D|$)", str(version)):
        raise bad("peft_version", f"is {version!r}: PEFT 0.19.0 wrote target_parameters (MoE experts) "
                  "LoRA in a known buggy layout; re-save the adapter with PEFT >= 0.19.1")
    return r, float(alpha), rslora, str(version), tps


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


def load_dir(path, experts_arch: dict[str, ExpertsArch] | None, model_type: str) -> AdapterWeights:
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError(f"{root}: not an adapter directory (missing or not a directory)")
    cfg_file = root / CONFIG_FILE
    cfg = _read_json(cfg_file, required=True)
    meta = _read_json(root / META_FILE, required=False) or {}
    r, alpha, rslora, version, tps = _check_config(cfg, cfg_file)
    raw = _load_tensors(root / WEIGHTS_FILE)
    model_type = model_type or str(meta.get("model_type") or "")
    archs = dict(experts_arch or {})
    legacy = bool(re.match(r"^0\.1[78]\.", version))

    # pair keys: stem -> {"A": t, "B": t}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterFormatError(f"{root / WEIGHTS_FILE}: unsupported key {key!r} (expected ...lora_A.weight / ...lora_B.weight)")
        stem = m.group(1)[len(PREFIX):] if m.group(1).startswith(PREFIX) else m.group(1)
        pairs.setdefault(stem, {})[m.group(2)] = t
    for stem, ab in pairs.items():
        if len(ab) != 2:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            raise AdapterFormatError(f"{root / WEIGHTS_FILE}: key {stem}.lora_{have}.weight has no "
                                     f"lora_{miss} partner ({stem}.lora_{miss}.weight missing)")

    tp_parts = [(t.rpartition(".")[0], t.rpartition(".")[2]) for t in tps]
    for _, pname in tp_parts:
        if pname not in PROJ_OF_PARAM:
            raise AdapterFormatError(f"{cfg_file}: target_parameters entry for {pname!r} is not supported "
                                     f"(only {sorted(PROJ_OF_PARAM)})")

    def arch_for(p, key):
        a = archs.get(p)
        if a is None:
            raise AdapterFormatError(f"{key}: experts_arch has no entry for experts module {p!r} "
                                     "(needed for num_experts / hidden / intermediate sizes)")
        return a

    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
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
            proj = PROJ_OF_PARAM[params[len(params) - 1 - depth]]
            arch = arch_for(base, key)
            add_expert(base, proj, peft_read(key, ab["A"], ab["B"], proj, arch, r, legacy, version), key)
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
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise AdapterFormatError(f"{key}: lora_A {list(a.shape)} / lora_B {list(b.shape)} disagree "
                                         f"with r={r} (expected lora_A [r, in], lora_B [out, r])")
            dense[stem] = (a, b)

    for p, ts in sglang.items():
        arch = arch_for(p, f"{PREFIX}{p}.gate_up_proj.lora_A.weight")
        if arch.interleaved_gate_up:
            raise AdapterFormatError(f"{p}: SGLang 3D experts LoRA on interleaved gate/up rows (GPT-OSS) "
                                     "is not supported (layout unverified)")
        projs, shared = sglang_read(p, ts, arch, r)
        for proj, ab in projs.items():
            add_expert(p, proj, ab, f"{PREFIX}{p}.{PARAM_OF_PROJ[proj]}.lora_A.weight")
        shared_dims[p] = {(pr, f) for pr, f in shared}
        found_arch[p] = arch

    for pfile, by_e in per_expert.items():
        p, arch, projs = _read_per_expert(pfile, by_e, archs, r, model_type)
        for proj, ab in projs.items():
            add_expert(p, proj, ab, f"{PREFIX}{pfile}.0")
        found_arch[p] = arch

    return _finish(cfg, meta, r, alpha, rslora, dense, experts, shared_dims, found_arch, model_type,
                   sglang_only=bool(sglang) and not per_expert, file=root / META_FILE)


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


def _finish(cfg, meta, r, alpha, rslora, dense, experts, shared_dims, found_arch, model_type,
            sglang_only, file) -> AdapterWeights:
    # one rank for the whole adapter: pad to the largest (2r after an unfused gate/up import)
    big_r = max([r] + [ab[0].shape[1] for d in experts.values() for ab in d.values()])
    if big_r != r:
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
    config = AdapterConfig(rank=big_r, alpha=alpha, target_modules=targets, experts=bool(experts),
                           expert_sharing=mode, use_rslora=rslora)
    return AdapterWeights(config=config, dense=dense, experts=experts, model_type=model_type,
                          base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
                          experts_arch={p: found_arch[p] for p in experts})
