"""What lorafleet attaches to in a model: found from its structure (`structure.discover`), with a
per-architecture table kept only for real exceptions and for the record of what was tested.

Any causal LM attaches whose decoder layers hold ``nn.Linear`` projections and, for MoE, packed
experts with transformers' experts interface; routers and gates are recognised by structure and
never targeted (see ``structure.py``). ``TESTED_MODEL_TYPES`` are the model types whose LoRA has
been checked against PEFT (``tests/test_architectures.py``, ``docs/architectures.md``); a model
type outside it still attaches, and one log line (once per type, logger ``lorafleet.models``)
names the type and the targets found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .structure import Structure, discover

log = logging.getLogger("lorafleet.models")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    moe: bool
    # linears of MoE blocks that are routers / gates (relative to a decoder layer), never targets
    router_linears: tuple[str, ...] = ()
    # short names of the linears LoRA can target (`Fleet.linear_names`)
    typical_targets: tuple[str, ...] = field(default=())
    # linears left out by the per-architecture exceptions (short name, why)
    excluded_linears: tuple[tuple[str, str], ...] = ()
    notes: str = ""
    layers_path: str = "model.layers"
    # packed experts lorafleet can put expert LoRA on / the ones it cannot (path -> what is missing)
    experts: tuple[str, ...] = ()
    experts_problems: tuple[tuple[str, str], ...] = ()
    tested: bool = False
    structure: Structure | None = field(default=None, compare=False, repr=False)


# Real exceptions only: nothing here changes what attaches, it documents what the structure
# cannot say (names of MLA projections, interleaved gate/up rows, experts lorafleet refuses).
NOTES: dict[str, str] = {
    "qwen2_moe": "shared_expert.{gate,up,down}_proj are plain linears; shared_expert_gate [1, H] is a gate",
    "deepseek_v3": "MLA attention (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj); "
                   "first_k_dense_replace layers are dense; shared_experts linears",
    "deepseek_v2": "MLA attention (q_a_proj/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj); shared_experts",
    "gpt_oss": "experts transposed [E, in, out] with biases; gate/up interleaved (is_concatenated=False)",
    "llama4_text": "Llama4TextExperts: no experts interface; called with every token for every expert",
    "dbrx": "DbrxExperts: w1/v1/w2 stored 2D [E*I, H] in experts.mlp; no experts interface",
    "gpt_neox": "layers at gpt_neox.layers; fused query_key_value",
    "jamba": "Mamba layers: dt_proj is read through .weight, not a target (EXCLUDED_LINEARS)",
    "phi3": "fused qkv_proj and gate_up_proj linears",
}

# Linears that are nn.Linear but must not be targets: the model reads their `.weight` directly,
# so a LoRA there would silently do nothing (in PEFT as well). model_type -> {short name: why}.
EXCLUDED_LINEARS: dict[str, dict[str, str]] = {
    "jamba": {"dt_proj": "JambaMambaMixer computes dt_proj.weight @ x without calling the module, "
                         "so LoRA on it would be ignored"},
}

# checked against PEFT (tests/test_architectures.py and tests/test_fleet_vs_peft.py)
TESTED_MODEL_TYPES: tuple[str, ...] = (
    # the nine debug architectures (lorafleet.models.debug)
    "llama", "qwen2", "qwen3", "qwen2_moe", "deepseek_v3", "qwen3_moe", "mixtral", "olmoe", "gpt_oss",
    # dense
    "mistral", "ministral", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "granite", "glm4", "olmo2",
    "olmo3", "cohere", "cohere2", "starcoder2", "smollm3", "exaone4", "seed_oss", "apertus",
    "hunyuan_v1_dense", "ernie4_5", "helium", "stablelm", "internlm3", "arcee", "gpt_neox",
    # MoE
    "granitemoe", "granitemoeshared", "jamba", "minimax", "minimax_m2", "phimoe", "lfm2_moe", "flex_olmo",
    "qwen3_5_moe_text", "qwen3_next", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "deepseek_v2",
    # dense LoRA only (their experts are refused, see NOTES)
    "llama4_text", "dbrx",
)
# kept for callers of the old name: the model types checked against PEFT
SUPPORTED_MODEL_TYPES = TESTED_MODEL_TYPES

_reported: set[str] = set()


def _refuse(model, model_type, why: str) -> ValueError:
    return ValueError(f"lorafleet cannot attach to model_type {model_type!r} ({type(model).__name__}): {why}")


def arch_spec(model) -> ArchSpec:
    """The attachment plan of ``model``, found from its structure; `ValueError` naming the model type
    and the module when there is nothing lorafleet can attach to."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if type(model).__module__.split(".")[0] == "peft":
        raise _refuse(model, model_type, "this is a PEFT-wrapped model; pass the base model "
                                         "(e.g. AutoModelForCausalLM) and load PEFT adapters with Fleet.load_adapter")
    st = discover(model, exclude=EXCLUDED_LINEARS.get(str(model_type)))
    if st is None:
        raise _refuse(model, model_type, "found no decoder layers (an nn.ModuleList of transformer blocks)")
    get_out = getattr(model, "get_output_embeddings", None)
    if get_out is None or get_out() is None:
        raise _refuse(model, model_type, f"no output head: lorafleet attaches to a causal LM (e.g. "
                                         f"AutoModelForCausalLM), not a bare backbone; decoder layers at {st.layers_path}")
    if not st.linears and not any(e.supported for e in st.experts.values()):
        kinds = sorted({type(m).__name__ for m in model.get_submodule(st.layers_path).modules()
                        if type(m).__name__ in ("Conv1D",)})
        extra = f" (its projections are {kinds[0]}, not nn.Linear)" if kinds else ""
        raise _refuse(model, model_type, f"{st.layers_path}.* has no nn.Linear projections and no packed "
                                         f"experts{extra}: nothing to put LoRA on")
    problems = st.problems()
    spec = ArchSpec(
        model_type=str(model_type),
        moe=st.moe and bool(st.packed_experts),
        router_linears=st.router_names,
        typical_targets=st.linear_names,
        excluded_linears=tuple(sorted({(p.rsplit(".", 1)[-1], why) for p, why in st.excluded.items()})),
        notes=NOTES.get(str(model_type), ""),
        layers_path=st.layers_path,
        experts=tuple(p for p, e in st.packed_experts.items() if e.supported),
        experts_problems=tuple(problems.items()),
        tested=model_type in TESTED_MODEL_TYPES,
        structure=st,
    )
    if model_type not in _reported:
        _reported.add(model_type)
        if spec.tested:
            log.info("lorafleet: %s (%s): %s", model_type, type(model).__name__, st.summary())
        else:
            log.warning("lorafleet: model_type %r (%s) is not among the types checked against PEFT; "
                        "attached by structure: %s", model_type, type(model).__name__, st.summary())
    return spec
