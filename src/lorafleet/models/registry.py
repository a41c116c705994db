"""Per-architecture facts lorafleet relies on, checked against transformers 5.17.

Every supported family keeps its decoder layers at ``model.layers`` and (for MoE) a packed
experts module (``gate_up_proj``/``down_proj`` 3D parameters, forward ``(hidden, top_k_index,
top_k_weights)``). Routers are never targets: most are not ``nn.Linear`` at all; the ones that
are (Qwen2-MoE's ``shared_expert_gate``) are listed in ``router_linears``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    moe: bool
    router_linears: tuple[str, ...] = ()
    # attention / MLP linears, for documentation and the error message of a wrong target
    typical_targets: tuple[str, ...] = field(default=())
    notes: str = ""


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

ARCHS: dict[str, ArchSpec] = {
    s.model_type: s
    for s in [
        ArchSpec("llama", False, typical_targets=_ATTN + _MLP),
        ArchSpec("qwen2", False, typical_targets=_ATTN + _MLP),
        ArchSpec("qwen3", False, typical_targets=_ATTN + _MLP),
        ArchSpec("qwen2_moe", True, router_linears=("shared_expert_gate",), typical_targets=_ATTN + _MLP,
                 notes="shared_expert.{gate,up,down}_proj are plain linears"),
        ArchSpec("qwen3_moe", True, typical_targets=_ATTN + _MLP),
        ArchSpec("mixtral", True, typical_targets=_ATTN),
        ArchSpec("olmoe", True, typical_targets=_ATTN),
        ArchSpec("deepseek_v3", True,
                 typical_targets=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") + _MLP,
                 notes="MLA attention; first_k_dense_replace layers are dense; shared_experts linears"),
        ArchSpec("gpt_oss", True, typical_targets=_ATTN,
                 notes="experts transposed [E, in, out] with biases; gate/up interleaved"),
    ]
}

SUPPORTED_MODEL_TYPES = tuple(ARCHS)


def arch_spec(model) -> ArchSpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"lorafleet does not support model_type {model_type!r} "
            f"({type(model).__name__}): no target table for it. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(
            f"{type(model).__name__} ({model_type}) is missing `model.layers`; lorafleet attaches to "
            "a causal LM (e.g. AutoModelForCausalLM), not a bare backbone or a wrapped model"
        )
    return ARCHS[model_type]
