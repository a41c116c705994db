"""PEFT ``adapter_config.json`` checks: what lorafleet can load exactly, what it refuses (base-
modifying inits, LoRA variants, router LoRA) and PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from ..config import pattern_value  # noqa: F401 (re-exported: the loader's PEFT pattern lookup)
from .formats_layouts import PROJ_OF_PARAM, PREFIX, AdapterFormatError
from .weights import ExpertsArch


# PEFT 0.21 `init_lora_weights` values. These rewrite the base weights at init (PiSSA / OLoRA /
# CorDA / LoRA-GA: W_res = W - scale·B0·A0; LoftQ: W -> a quantized W); an adapter saved without
# conversion is only right on that modified base, never on the original one lorafleet shares.
_CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")  # PEFT can convert them at save time
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # base untouched: the file is a plain LoRA
# LoraConfig fields that switch on a PEFT variant whose forward or training is not plain LoRA
_VARIANT_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter applies only after its invocation tokens)",
    "use_qalora": "QA-LoRA (group-pooled LoRA input)",
    "layer_replication": "layer replication (changes the base model's layer stack)",
    "trainable_token_indices": "trainable tokens (extra embedding rows)",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA factors)",
    "arrow_config": "Arrow (routing between LoRA experts)",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA (sampled LoRA factors)",
    "velora_config": "VeLoRA (compressed activations in backward)",
}


def check_config(cfg: dict, file: Path):
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
        raise bad("modules_to_save", f"is {cfg.get('modules_to_save')!r}: a full trained copy of a module per adapter "
                  "is not a LoRA slot (lorafleet shares one frozen base); for new tokens put LoRA on them instead, "
                  "target_modules ['embed_tokens', 'lm_head']")
    for field, what in _VARIANT_FIELDS.items():
        if cfg.get(field):
            raise bad(field, f"is {cfg.get(field)!r}: PEFT's {what} is not plain LoRA; lorafleet does not implement it")
    _check_init(cfg.get("init_lora_weights", True), bad)
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(field) or {}
        if not isinstance(pat, dict):
            raise bad(field, f"is {pat!r}; expected an object of module pattern -> value")
        for k, v in pat.items():
            ok = isinstance(v, int) and v >= 1 if field == "rank_pattern" else \
                isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok:
                want = "positive integer" if field == "rank_pattern" else "finite number"
                raise bad(field, f"entry {k!r}: {v!r} is not a {want}")
            try:
                re.compile(k)
            except re.error as exc:
                raise bad(field, f"entry {k!r} is not a valid regular expression ({exc})") from exc
        patterns[field] = pat
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", f"is {r!r}; expected a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad("lora_alpha", f"is {alpha!r}; expected a finite number")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad("use_rslora", f"is {rslora!r}; expected true or false")
    dropout = cfg.get("lora_dropout", 0.0) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("lora_dropout", f"is {dropout!r}; expected a number in [0, 1)")
    lt = cfg.get("layers_to_transform")
    if lt is not None and not (isinstance(lt, int) and not isinstance(lt, bool) and lt >= 0) and not (
            isinstance(lt, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lt)):
        raise bad("layers_to_transform", f"is {lt!r}; expected a layer index or a list of layer indices")
    lp = cfg.get("layers_pattern")
    if lp is not None and not isinstance(lp, str) and not (
            isinstance(lp, list) and all(isinstance(p, str) for p in lp)):
        raise bad("layers_pattern", f"is {lp!r}; expected a string or a list of strings")
    version = cfg.get("peft_version") or ""
    tps = cfg.get("target_parameters") or []
    if not isinstance(tps, list) or not all(isinstance(t, str) for t in tps):
        raise bad("target_parameters", f"is {tps!r}; expected a list of parameter names")
    if tps and re.match(r"^0\.19\.0(\D|$)", str(version)):
        raise bad("peft_version", f"is {version!r}: PEFT 0.19.0 wrote target_parameters (MoE experts) "
                  "LoRA in a known buggy layout; re-save the adapter with PEFT >= 0.19.1")
    return r, float(alpha), rslora, str(version), tps, patterns["rank_pattern"], patterns["alpha_pattern"]


def peft_layer_index(key: str, layers_pattern) -> int | None:
    """PEFT 0.21's decoder layer index of module ``key`` (``check_target_module_exists``): the
    first ``<layers_pattern>.<n>.``, or without a pattern the first numbered segment."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _check_init(init, bad) -> None:
    """Refuse inits that modified the base weights; warn where PEFT trains differently."""
    if isinstance(init, bool):
        return
    if not isinstance(init, str):
        raise bad("init_lora_weights", f"is {init!r}; expected true, false or a PEFT init name")
    low = init.lower()
    if low.startswith(_CONVERTIBLE_INITS):
        raise bad("init_lora_weights", (
            f"is {init!r}: this init subtracts the initial LoRA from the base weights, so the saved adapter "
            "is only right on that modified base, not on the original base model lorafleet uses (loading it "
            "would silently give wrong outputs). Convert it in PEFT: save the untrained adapter right after "
            "get_peft_model (model.save_pretrained(init_dir)), then save the trained one with "
            "model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir); that writes a "
            "plain LoRA (init_lora_weights true, rank 2r) for the original base, which loads here"))
    if low == "loftq":
        raise bad("init_lora_weights", (
            "is 'loftq': LoftQ replaces the base weights by a quantized approximation and fits the adapter to "
            "that base, so it is wrong on the original base lorafleet uses; PEFT's "
            "path_initial_model_for_weight_conversion only converts PiSSA / OLoRA / CorDA / LoRA-GA adapters, "
            "not LoftQ"))
    if low == "mica":
        warnings.warn(
            "init_lora_weights 'mica': PEFT keeps MiCA's lora_B frozen in training; lorafleet trains A and B, "
            "so outputs are exact but continued training differs from PEFT", UserWarning, stacklevel=5)
        return
    if low not in _PLAIN_INITS:
        raise bad("init_lora_weights", f"is {init!r}: unknown init (known to be a plain LoRA: true, false, "
                  f"{', '.join(repr(i) for i in _PLAIN_INITS)}, 'mica')")




_ROUTER_HINT = (
    "a router LoRA changes which experts each token is sent to; lorafleet keeps routers frozen and cannot "
    "apply one, so loading the rest would not reproduce the adapter. PEFT targets the router for "
    "target_modules='all-linear' on MoE models; train with an explicit list instead, e.g. "
    "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] "
    "(PEFT maps gate/up/down onto the packed experts)")


def _is_router(stem: str, out: int, archs: dict[str, ExpertsArch]) -> bool:
    """A module whose outputs are the expert count of an experts module next to it, or one gate."""
    parent = stem.rpartition(".")[0]
    near = [a for p, a in archs.items() if p.rpartition(".")[0] == parent]
    return out == 1 or any(a.num_experts == out for a in near) or stem.rsplit(".", 1)[-1] in ("gate", "router")


def unsupported_parameter(cfg_file, tp, mp, pname, pairs, archs) -> AdapterFormatError:
    stems = sorted(st for st in pairs if mp and (st == mp or st.endswith("." + mp)))
    outs = {pairs[st]["B"].shape[0] for st in stems if "B" in pairs[st]}
    if stems and pname == "weight" and all(_is_router(st, o, archs) for st in stems for o in outs):
        more = f" and {len(stems) - 1} more" if len(stems) > 1 else ""
        return AdapterFormatError(f"{cfg_file}: target_parameters entry {tp!r} puts LoRA on the MoE router "
                                  f"({stems[0]}{more}, {max(outs)} outputs): {_ROUTER_HINT}")
    return AdapterFormatError(f"{cfg_file}: target_parameters entry {tp!r} ({pname!r}) is not supported: lorafleet "
                              f"puts LoRA on packed experts' {' / '.join(sorted(PROJ_OF_PARAM))} only")


def not_a_target(file, stem, out, archs, linear_shapes) -> AdapterFormatError:
    key = f"{PREFIX}{stem}.lora_A.weight"
    if _is_router(stem, out, archs):
        return AdapterFormatError(f"{file}: {key}: LoRA on the router / gate linear {stem!r} ({out} outputs): "
                                  f"{_ROUTER_HINT}")
    short = sorted({p.rsplit(".", 1)[-1] for p in linear_shapes})
    return AdapterFormatError(f"{file}: {key}: unknown target module {stem!r} for this base model; lorafleet puts LoRA "
                              f"on the decoder layers' linears ({', '.join(short)}), packed experts, lm_head "
                              "and the input embedding only (not on routers)")
