"""Adapter directories <-> :class:`AdapterWeights` (PEFT, vLLM and SGLang layouts).

A directory holds ``adapter_model.safetensors``, ``adapter_config.json`` (PEFT's LoRA config) and
``lorafleet.json`` (``format``, ``expert_sharing``, ``model_type``, ``rank``, ``lorafleet_version``;
PEFT and the engines ignore it). Dense modules always use PEFT's names
``base_model.model.<path>.lora_A.weight [r, in]`` / ``.lora_B.weight [out, r]``. MoE experts:

- ``format="peft"``: PEFT >= 0.19.1 ``target_parameters`` layout (``...experts.base_layer.lora_A``
  for ``gate_up_proj``, ``...experts.lora_A`` for ``down_proj``); loads with
  ``peft.PeftModel.from_pretrained``. Shared factors are replicated per expert.
- ``format="vllm"``: per-expert 2D names ``...experts.{e}.gate_proj|up_proj|down_proj`` (Mixtral:
  ``block_sparse_moe.experts.{e}.w1|w3|w2``); gate and up share the fused A.
- ``format="sglang"``: SGLang's native 3D names ``...experts.gate_up_proj.lora_A.weight (1|E, r, H)``
  etc. Factors shared by all experts (``expert_sharing="shared_outer"``: gate_up A and down B)
  keep expert dim 1, and **SGLang must then be started with ``--experts-shared-outer-loras``**: the
  file carries no tag for it. SGLang's per-expert pool fills expert e from index e only, so
  ``"shared_a"`` copies its gate_up A and its down A per expert. GPT-OSS (interleaved gate/up
  rows) is refused: SGLang's row layout for it is unverified. SGLang stacks dense q/k/v and
  gate/up from the q_proj / gate_proj key, so a group the adapter targets only partly gets zero
  LoRA for its other members (``AdapterWeights.linear_out_features`` gives their sizes; a zero
  LoRA changes nothing); on load such all-zero partners of an ``sglang`` file are dropped again.

:func:`load_adapter_dir` reads all three back (plus PEFT 0.17/0.18 ``target_parameters`` files,
whose A/B roles are swapped for HF-v5 weights) and refuses what it cannot represent exactly.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import torch

from .formats_layouts import (
    CONFIG_FILE, META_FILE, MIXTRAL_NAMES, PARAM_OF_PROJ, PREFIX, PROJS, VLLM_NAMES, WEIGHTS_FILE,
    AdapterFormatError, peft_write, proj_dims, sglang_dense_partners, sglang_write, vllm_write,
)
from .formats_load import load_dir
from ..utils.atomic import atomic_dir
from .weights import AdapterWeights, ExpertsArch

__all__ = ["AdapterFormatError", "FORMATS", "save_adapter_dir", "load_adapter_dir"]

FORMATS = ("peft", "vllm", "sglang")
# PEFT 0.21 on transformers v5 rewrites these short target names into the fused-experts
# `target_parameters` for these model types on every load (its v4->v5 MoE config conversion), so
# a PEFT file that targets the *dense* linears of those names cannot be loaded faithfully by PEFT.
# model types whose dense gate/up/down linears PEFT 0.21 re-targets to the fused experts
# (measured on transformers 5.24: such a PEFT file does not load faithfully in PEFT)
PEFT_REMAPPED_TARGETS = {t: {"gate_proj", "up_proj", "down_proj"} for t in (
    "deepseek_v3", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "qwen3_next")}
# model types whose vLLM 0.32 model class declares `embedding_modules` {"embed_tokens", "lm_head"}
# (vllm/model_executor/models/*.py; vLLM's LoRA loader skips embedding / lm_head LoRA elsewhere,
# e.g. Mistral sets it to {} and Qwen2, Qwen2-MoE, OLMoE, DeepSeek, GPT-OSS have none)
VLLM_VOCAB_LORA_TYPES = frozenset({
    "llama", "qwen3", "qwen3_moe", "mixtral", "granite", "granitemoe", "granitemoeshared", "granitemoehybrid",
    "exaone", "exaone4", "jamba", "phimoe", "lfm2", "lfm2_moe", "apertus", "nemotron", "nemotron_h", "minicpm",
    "solar", "falcon_h1"})
LORAFLEET_VERSION = "0.1.0"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.\d+\.(.+)$")


def _peft_version() -> str:
    try:
        from importlib.metadata import version
        return version("peft")
    except Exception:  # noqa: BLE001 - peft not installed: write the version we target
        return "0.21.2"


# =============================================================================== save
def save_adapter_dir(weights: AdapterWeights, path, format: str = "peft") -> None:  # noqa: A002
    """Write ``weights`` as an adapter directory in ``format`` ("peft" | "vllm" | "sglang").

    The directory is built next to ``path`` and renamed into place, so a failure never leaves a
    half-written adapter. An existing adapter directory (or empty directory) at ``path`` is
    replaced; any other existing path is refused.
    """
    _write_dir(Path(path), *adapter_files(weights, format))


def adapter_files(weights: AdapterWeights, format: str = "peft"):  # noqa: A002
    """``(tensors, adapter_config, meta)`` of ``weights`` in ``format``, in memory: the tensors are
    CPU copies (never views of the fleet's banks), ``adapter_config`` is PEFT's config dict and
    ``meta`` lorafleet's own record. `save_adapter_dir` writes exactly these."""
    if format not in FORMATS:
        raise AdapterFormatError(f"unknown adapter format {format!r}; valid formats: {', '.join(FORMATS)}")
    cfg = weights.config
    r = cfg.slot_rank
    archs = _check_weights(weights)
    interleaved = {p: archs[p].interleaved_gate_up for p in archs}
    _check_vocab_export(weights, format)
    if format != "peft":
        weights = _fold_scales(weights, format)
    if format == "sglang":
        bad = [p for p, il in interleaved.items() if il]
        if bad:
            raise AdapterFormatError(
                f"format 'sglang': experts {bad[0]!r} have interleaved gate/up rows (GPT-OSS); "
                "SGLang's layout for them is unverified, export with format 'peft' or 'vllm'"
            )
    # PEFT: each module at the rank it uses (zero-padded tails of an imported rank_pattern adapter
    # are cut again), rank_pattern / alpha_pattern keeping every scale; other formats: one rank
    used = _used_ranks(weights) if format == "peft" else {}
    tensors: dict[str, torch.Tensor] = {}
    for p, (a, b) in weights.dense.items():
        k = used.get(p, r)
        tensors[f"{PREFIX}{p}.lora_A.weight"] = a[:k].detach().cpu().contiguous().clone()
        tensors[f"{PREFIX}{p}.lora_B.weight"] = b[:, :k].detach().cpu().contiguous().clone()
    for p, (a, b) in weights.embeddings.items():  # PEFT lora.Embedding names (no ".weight")
        k = used.get(p, r)
        tensors[f"{PREFIX}{p}.lora_embedding_A"] = a[:k].detach().cpu().contiguous().clone()
        tensors[f"{PREFIX}{p}.lora_embedding_B"] = b[:, :k].detach().cpu().contiguous().clone()
    target_modules = {p.rsplit(".", 1)[-1] for p in list(weights.dense) + list(weights.embeddings)}
    if format == "sglang":  # zero LoRA for the q/k/v, gate/up members SGLang stacks beside a targeted one
        partners = sglang_dense_partners(tensors, lambda path: _partner_size(weights, path))
        tensors.update(partners)
        target_modules.update(k[: -len(".lora_A.weight")].rsplit(".", 1)[-1] for k in partners
                              if k.endswith(".lora_A.weight"))
    target_parameters: set[str] = set()
    projs_used = [pr for pr in PROJS if any(pr in d for d in weights.experts.values())]
    mixtral = weights.model_type == "mixtral"
    for p, projs in weights.experts.items():
        arch = archs[p]
        if format == "peft":
            m = _LAYER_RE.search(p)
            # layer-restricted: full paths (PEFT's layers_to_transform does not restrict target_parameters)
            suffix = m.group(1) if m and cfg.layers_to_transform is None else p
            for i, proj in enumerate(projs_used):
                target_parameters.add(f"{suffix}.{PARAM_OF_PROJ[proj]}")
                if proj in projs:  # gate_up registered first -> wrapped first -> inner (.base_layer)
                    stem = PREFIX + p + ".base_layer" * (len(projs_used) - 1 - i)
                    k = used.get(f"{p}.{PARAM_OF_PROJ[proj]}", r)
                    a, b = projs[proj]
                    tensors.update(peft_write(stem, a[:, :k], b[:, :, :k], arch.num_experts))
        elif format == "vllm":
            names = MIXTRAL_NAMES if mixtral else VLLM_NAMES
            q = re.sub(r"\.mlp\.experts$", ".block_sparse_moe.experts", p) if mixtral else p
            tensors.update(vllm_write(PREFIX + q, projs, arch, r, names, interleaved[p]))
            target_modules.update(names)
        else:
            tensors.update(sglang_write(PREFIX + p, projs, arch, r))
            target_modules.update(PARAM_OF_PROJ[pr] for pr in projs_used)
    remapped = sorted(target_modules & PEFT_REMAPPED_TARGETS.get(weights.model_type, set()))
    if format == "peft" and remapped:
        warnings.warn(
            f"{weights.model_type}: this adapter targets the dense linears {remapped}; the file is standard, "
            "but PEFT 0.21 with transformers v5 re-targets those names to the fused MoE experts on load, "
            "so PeftModel.from_pretrained will not reproduce it (vLLM reads it as written)",
            stacklevel=2,
        )
    if format == "peft":
        scales = {k: cfg.module_scale(k) for k in used}
        r_file, alpha, rank_pattern, alpha_pattern = _rank_patterns(used, scales, r, cfg.alpha, cfg.use_rslora)
    else:  # one rank and one scale in the engines' layouts (other module scales folded into B above)
        alpha = cfg.alpha if r == cfg.rank else cfg.scale * (math.sqrt(r) if cfg.use_rslora else r)
        r_file, rank_pattern, alpha_pattern = r, {}, {}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r_file,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(target_modules),
        "use_rslora": bool(cfg.use_rslora),
        "bias": "none",
        "lora_dropout": _number(cfg.lora_dropout),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        "base_model_name_or_path": weights.base_model_name_or_path or None,
        "peft_version": _peft_version(),
    }
    if target_parameters:
        adapter_config["target_parameters"] = sorted(target_parameters)
    if cfg.layers_to_transform is not None:
        adapter_config["layers_to_transform"] = list(cfg.layers_to_transform)
        adapter_config["layers_pattern"] = weights.layers_path.rsplit(".", 1)[-1] or "layers"
    meta = {"format": format, "expert_sharing": cfg.expert_sharing, "model_type": weights.model_type,
            "rank": r, "lorafleet_version": LORAFLEET_VERSION}
    return tensors, adapter_config, meta


def _partner_size(weights: AdapterWeights, path: str) -> int | None:
    """out_features of the stacking partner ``path`` SGLang needs (None: unknown, refused by the caller)."""
    known = weights.linear_out_features
    if known and path not in known:  # the base's linears are known and this one is not among them
        raise AdapterFormatError(
            f"format 'sglang': SGLang 0.5.23 stacks q_proj with k_proj / v_proj and gate_proj with up_proj and needs "
            f"LoRA for each, but this base model has no {path}; export with format 'peft' or 'vllm'")
    return known.get(path)


def _check_vocab_export(weights: AdapterWeights, format: str) -> None:  # noqa: A002
    """vLLM / SGLang layouts of LoRA on the LM head / input embedding: refused where the engine
    does not load it (it would serve the adapter without those deltas)."""
    # the LM head: the dense module outside the decoder layers
    vocab = list(weights.embeddings) + [p for p in weights.dense if not p.startswith(weights.layers_path + ".")]
    if not vocab or format == "peft":
        return
    if format == "vllm" and weights.model_type not in VLLM_VOCAB_LORA_TYPES:
        raise AdapterFormatError(
            f"format 'vllm': the adapter has LoRA on {vocab[0]!r}, but vLLM 0.32 does not load embedding / lm_head "
            f"LoRA for model type {weights.model_type or '(unknown)'!r} (its model class declares no "
            "embedding_modules); export with format 'peft', or train without embed_tokens / lm_head targets")
    if format == "sglang":
        raise AdapterFormatError(
            f"format 'sglang': the adapter has LoRA on {vocab[0]!r}; lorafleet's SGLang layout covers the decoder "
            "linears and experts only (embedding / lm_head LoRA in SGLang is unverified); export with format 'peft'"
            " or 'vllm'")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _used_ranks(weights: AdapterWeights) -> dict[str, int]:
    """PEFT module key (dense path, or ``<experts path>.<param>``) -> the rank it uses: one past its
    last rank component with a non-zero A row or B column (at least 1). Cutting the all-zero tail
    is exact, and in training too (a zero A row / B column pair has zero gradients)."""
    def used(a, b, dim_a, dim_b):
        nz = a.ne(0).movedim(dim_a, 0).flatten(1).any(1) | b.ne(0).movedim(dim_b, 0).flatten(1).any(1)
        idx = nz.nonzero()
        return int(idx[-1]) + 1 if idx.numel() else 1

    out = {p: used(a, b, 0, 1) for p, (a, b) in list(weights.dense.items()) + list(weights.embeddings.items())}
    for p, projs in weights.experts.items():
        for proj, (a, b) in projs.items():
            out[f"{p}.{PARAM_OF_PROJ[proj]}"] = used(a, b, 1, 2)
    return out


def _fold_scales(weights: AdapterWeights, format: str) -> AdapterWeights:  # noqa: A002
    """For the one-alpha engine layouts (vLLM / SGLang serve, they do not train): a module whose
    scale differs from the adapter's has ``scale_m / scale`` multiplied into a copy of its B, which
    serves the same outputs. ``weights`` itself is not changed."""
    cfg = weights.config
    s0 = cfg.scale

    def fold(key, b):
        sm = cfg.module_scale(key)
        if sm == s0:
            return b
        if s0 == 0:
            raise AdapterFormatError(f"format {format!r}: module {key} has LoRA scale {sm:g} but the adapter's is 0 "
                                     "(lora_alpha 0): this one-alpha layout cannot express it; export with format "
                                     "'peft'")
        return (b.double() * (sm / s0)).to(b.dtype)

    out = copy.copy(weights)
    out.dense = {p: (a, fold(p, b)) for p, (a, b) in weights.dense.items()}
    out.embeddings = {p: (a, fold(p, b)) for p, (a, b) in weights.embeddings.items()}
    out.experts = {p: {pr: (a, fold(f"{p}.{PARAM_OF_PROJ[pr]}", b)) for pr, (a, b) in projs.items()}
                   for p, projs in weights.experts.items()}
    bad = next((k for k, t in out.tensors() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise AdapterFormatError(f"format {format!r}: folding the per-module LoRA scale of {bad} into lora_B "
                                 "overflows; export with format 'peft'")
    return out


def _rank_patterns(used: dict[str, int], scales: dict[str, float], r: int, alpha: float, rslora: bool):
    """(r, lora_alpha, rank_pattern, alpha_pattern) for PEFT that give each module ``used[key]``
    and its scale ``scales[key]``. The most common (rank, scale) is the default; a module name (last
    key part) whose modules all share another one gets one ``.*\\.<name>`` entry (as PEFT writes
    them), else each such module its own escaped full key. One rank and scale: ``r``, ``alpha``."""
    def alpha_for(k, sc):  # the alpha that gives scale sc at rank k
        return _number(sc * (math.sqrt(k) if rslora else k))

    pairs = {key: (used[key], scales[key]) for key in used}
    base_scale = alpha / (math.sqrt(r) if rslora else r)
    if not pairs or all(k == r and math.isclose(sc, base_scale, rel_tol=1e-12) for k, sc in pairs.values()):
        return r, alpha, {}, {}
    counts: dict[tuple, int] = {}
    for v in pairs.values():
        counts[v] = counts.get(v, 0) + 1
    default = max(counts, key=lambda v: (counts[v], v[0], v[1] == base_scale))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}

    def put(pat, v):
        rank_pattern[pat], alpha_pattern[pat] = v[0], alpha_for(*v)

    groups: dict[str, list[str]] = {}
    for key in pairs:
        groups.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for name, keys in sorted(groups.items()):
        vals = {pairs[k] for k in keys}
        if vals == {default}:
            continue
        if len(vals) == 1 and all("." in k for k in keys):  # ".*\.lm_head" would not match a top-level "lm_head"
            put(rf".*\.{re.escape(name)}", pairs[keys[0]])
        else:
            for k in sorted(keys):
                if pairs[k] != default:
                    put(re.escape(k), pairs[k])
    return default[0], alpha_for(*default), rank_pattern, alpha_pattern


def _check_weights(weights: AdapterWeights) -> dict[str, ExpertsArch]:
    """Validate shapes against the rank; return an ExpertsArch for every experts path."""
    r = weights.config.slot_rank
    for p, (a, b) in list(weights.dense.items()) + list(weights.embeddings.items()):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFormatError(
                f"dense {p!r}: A {list(a.shape)} / B {list(b.shape)} disagree with rank {r} "
                "(expected A [r, in], B [out, r])"
            )
    archs = {}
    for p, projs in weights.experts.items():
        unknown = set(projs) - set(PROJS)
        if unknown or not projs:
            raise AdapterFormatError(f"experts {p!r}: projections must be among {PROJS}, got {sorted(projs)}")
        for proj, (a, b) in projs.items():
            if a.dim() != 3 or b.dim() != 3 or a.shape[1] != r or b.shape[2] != r:
                raise AdapterFormatError(
                    f"experts {p!r} {proj}: A {list(a.shape)} / B {list(b.shape)} disagree with rank {r} "
                    "(expected A [E_A, r, in], B [E_B, out, r])"
                )
        arch = weights.experts_arch.get(p)
        if arch is None:
            num_e = max(t.shape[0] for ab in projs.values() for t in ab)
            if "gate_up" in projs:
                hid, inter = projs["gate_up"][0].shape[2], projs["gate_up"][1].shape[1] // 2
            else:
                hid, inter = projs["down"][1].shape[1], projs["down"][0].shape[2]
            arch = ExpertsArch(num_e, hid, inter, weights.model_type == "gpt_oss")
        for proj, (a, b) in projs.items():
            fin, fout = proj_dims(proj, arch)
            for name, t, dim in (("A", a, fin), ("B", b, fout)):
                got = t.shape[2] if name == "A" else t.shape[1]
                if got != dim or t.shape[0] not in (1, arch.num_experts):
                    raise AdapterFormatError(
                        f"experts {p!r} {proj}.{name} {list(t.shape)} disagrees with num_experts="
                        f"{arch.num_experts}, hidden={arch.hidden_size}, intermediate={arch.intermediate_size}"
                    )
        archs[p] = arch
    return archs


def _write_dir(path: Path, tensors, adapter_config, meta) -> None:
    from safetensors.torch import save_file

    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path}: exists and is not a directory; refusing to overwrite it")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).exists():
        raise AdapterFormatError(
            f"{path}: is a non-empty directory without {CONFIG_FILE}; refusing to replace it"
        )
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# =============================================================================== load
def load_adapter_dir(path, *, experts_arch: dict[str, ExpertsArch] | None = None,
                     model_type: str = "", linear_shapes: dict[str, tuple[int, int]] | None = None,
                     embedding_shapes: dict[str, tuple[int, int]] | None = None) -> AdapterWeights:
    """Read an adapter directory in any of the three layouts into :class:`AdapterWeights`.

    ``experts_arch[path]`` (E / H / I and the gate/up row order per experts module) is required
    for the PEFT ``target_parameters`` and SGLang layouts. The adapter gets one slot rank, every
    update unchanged: modules of a lower rank (PEFT ``rank_pattern``, or all but an unfused
    gate/up pair that becomes its exact fused form of rank 2r) are zero-padded to the largest and
    alpha set so ``config.scale`` is the most common module scale (``config.rank`` says so; the
    caller checks it against its max rank); a module whose PEFT scale differs keeps it as an
    ``config.alpha_pattern`` entry (its escaped full key), exact for outputs and training.

    ``linear_shapes`` (path -> (in, out) of every base linear that can carry LoRA, as a fleet
    passes it): modules of the targeted names that the file leaves out (``layers_to_transform``,
    regex ``target_modules``) and experts modules / projections it leaves out get zero LoRA, which
    stays zero under training; a module that is not among them (a router) is refused. The LM head
    is a linear like any other (PEFT ``lm_head.lora_A/B.weight``); ``embedding_shapes`` (path ->
    (vocab, dim)) names the input embeddings whose ``lora_embedding_A/B`` the file may hold. A
    ``...base_layer.weight`` PEFT saved beside them comes back in ``base_layers`` (the fleet
    refuses the adapter unless it equals its own base weight). In a file lorafleet.json marks
    ``sglang`` (never a PEFT file), a q/k/v or gate/up module name whose every pair is zero and sits
    beside a kept member of its group (the ``sglang`` export's stacking partners) is dropped, so
    the adapter's targets survive a round trip (exact: a zero pair stays zero under training).

    Refused with :class:`AdapterFormatError` (a ``ValueError``) naming the field or key: anything
    lorafleet cannot reproduce, e.g. PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ adapters saved
    without PEFT's ``path_initial_model_for_weight_conversion``, router LoRA, DoRA, LoRA variants.
    """
    return load_dir(path, experts_arch, model_type, linear_shapes, embedding_shapes)
