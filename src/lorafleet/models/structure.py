"""Find what LoRA can attach to in a Hugging Face causal LM from the model itself.

No per-architecture table is needed for a model whose structure is one lorafleet knows:

- **decoder layers**: the ``nn.ModuleList`` of transformer blocks (``model.layers``,
  ``gpt_neox.layers``, ``transformer.blocks``, ``model.language_model.layers`` ...): the list
  whose elements are ``GradientCheckpointingLayer``s, else the largest one by parameter count;
- **dense targets**: every ``nn.Linear`` inside a decoder layer (attention, MLP, shared experts,
  linear-attention / Mamba projections), except routers and gates;
- **packed experts**: a module with 3D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``
  parameters carrying transformers' experts interface (``use_experts_implementation``:
  ``has_gate``, ``is_transposed``, ``is_concatenated``, ``has_bias``, ``_apply_gate``), called as
  ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.  Other packed experts
  (Llama 4's, DBRX's) are found too and reported with what they lack; the model still attaches
  with ``experts=False`` (dense LoRA only);
- **routers and gates** (never targets): inside an MoE block (the module that holds the
  experts), an ``nn.Linear`` from the hidden size to the expert count or to 1 that is the block's
  own child or the only linear of its parent (Phi-MoE ``router``, HunYuan ``gate.wg``, Llama 4
  ``router``, DBRX ``router.layer``, Qwen2-MoE / Qwen3-Next / Qwen3.5 ``shared_expert_gate``).
  A shared-expert MLP (several linears) is never mistaken for one. Routers that are not
  ``nn.Linear`` (``*TopKRouter``) are not targets anyway.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

try:  # transformers >= 5: every decoder block subclasses it
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - older transformers
    GradientCheckpointingLayer = None

__all__ = ["ExpertsInfo", "Structure", "find_layers", "discover"]

# config fields that hold the number of routed experts, in the order transformers uses them
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class ExpertsInfo:
    path: str
    module: nn.Module
    num_experts: int | None
    packed: bool  # False: a ModuleList of per-expert MLPs (their linears are dense targets)
    problem: str = ""  # why lorafleet cannot put expert LoRA on it ("" = it can)

    @property
    def supported(self) -> bool:
        return self.packed and not self.problem


@dataclass
class Structure:
    model_type: str
    class_name: str
    layers_path: str
    num_layers: int
    hidden_size: int | None
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # path -> LoRA target
    routers: dict[str, str] = field(default_factory=dict)  # path -> why it is not a target
    excluded: dict[str, str] = field(default_factory=dict)  # path -> why (per-architecture exceptions)
    experts: dict[str, ExpertsInfo] = field(default_factory=dict)  # path -> packed/listed experts

    @property
    def moe(self) -> bool:
        return bool(self.experts)

    @property
    def packed_experts(self) -> dict[str, ExpertsInfo]:
        return {p: e for p, e in self.experts.items() if e.packed}

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(sorted({p.rsplit(".", 1)[-1] for p in self.linears}))

    @property
    def router_names(self) -> tuple[str, ...]:
        return tuple(sorted({_rel(p, self.layers_path) for p in self.routers}))

    def experts_names(self) -> tuple[str, ...]:
        return tuple(sorted({_rel(p, self.layers_path) for p in self.packed_experts}))

    def problems(self) -> dict[str, str]:
        return {p: e.problem for p, e in self.experts.items() if e.problem}

    def summary(self) -> str:
        parts = [f"decoder layers at {self.layers_path} ({self.num_layers})",
                 f"LoRA targets {list(self.linear_names)}"]
        if self.packed_experts:
            ok = sorted({_rel(p, self.layers_path) for p, e in self.packed_experts.items() if e.supported})
            bad = sorted({_rel(p, self.layers_path) for p, e in self.packed_experts.items() if not e.supported})
            if ok:
                parts.append(f"packed experts {ok}")
            if bad:
                parts.append(f"packed experts without expert LoRA support {bad}")
        if self.routers:
            parts.append(f"routers/gates excluded {list(self.router_names)}")
        if self.excluded:
            parts.append(f"also excluded {sorted({_rel(p, self.layers_path) for p in self.excluded})}")
        return ", ".join(parts)


def _rel(path: str, layers_path: str) -> str:
    """``model.layers.3.mlp.gate`` -> ``mlp.gate``."""
    rest = path[len(layers_path) + 1:] if path.startswith(layers_path + ".") else path
    return rest.split(".", 1)[1] if "." in rest else rest


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of the decoder layers, or None."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not name:
            continue
        blocks = GradientCheckpointingLayer is not None and all(
            isinstance(m, GradientCheckpointingLayer) for m in mod
        )
        size = sum(p.numel() for p in mod.parameters())
        if size == 0:
            continue
        key = (blocks, size)
        if best is None or key > best[0]:
            best = (key, name, mod)
    return None if best is None else (best[1], best[2])


def _param3d(module: nn.Module, name: str):
    p = module._parameters.get(name) if hasattr(module, "_parameters") else None
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def _has_3d_params(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _is_experts_candidate(name: str, module: nn.Module) -> bool:
    short = name.rsplit(".", 1)[-1]
    return short == "experts" or type(module).__name__.endswith("Experts") or _has_3d_params(module)


def _forward_args(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _experts_problem(module: nn.Module) -> str:
    """What a packed experts module lacks for `MultiLoRAExperts` ("" if nothing)."""
    cls = type(module).__name__
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        held = ", ".join(f"{n} {list(p.shape)}" for n, p in module.named_parameters())
        args = _forward_args(module)
        call = (f"its forward({', '.join(args)}) takes no top_k_index / top_k_weights (the block feeds it "
                "every token for every expert, pre-scaled by the router)") if len(args) < 3 else \
            f"forward({', '.join(args)})"
        if not any(p.dim() == 3 for p in module.parameters()):
            layout = "its expert weights are not 3D [E, out, in] / [E, in, out] tensors"
        else:
            layout = "its weights are 3D"
        return (
            f"{cls} holds {held}; {layout}, it has no transformers experts interface (no `has_gate` / "
            f"`is_transposed` / `is_concatenated` / `has_bias` from `use_experts_implementation`, no "
            f"`_apply_gate`); {call}"
        )
    if getattr(module, "has_post_expert_norm", False):
        return f"{cls} applies a norm after each expert (`has_post_expert_norm`), which MultiLoRAExperts does not"
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    if _param3d(module, up_name) is None or _param3d(module, "down_proj") is None:
        return f"{cls} has no 3D `{up_name}` / `down_proj` parameters"
    if module.has_gate and not hasattr(module, "_apply_gate"):
        return f"{cls} has a gate but no `_apply_gate`"
    if not module.has_gate and not hasattr(module, "act_fn"):
        return f"{cls} has no gate and no `act_fn`"
    if getattr(module, "has_bias", False):
        missing = [n for n in (f"{up_name}_bias", "down_proj_bias") if getattr(module, n, None) is None]
        if missing:
            return f"{cls} says has_bias but lacks {missing}"
    return ""


def _num_experts(module: nn.Module, config) -> int | None:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return len(module)
    for name in ("gate_up_proj", "up_proj", "down_proj"):
        p = _param3d(module, name)
        if p is not None:
            return int(p.shape[0])
    for attr in ("num_experts", "moe_num_experts", "num_local_experts"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    for key in EXPERT_COUNT_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def _hidden_size(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings()
        if emb is not None and hasattr(emb, "embedding_dim"):
            return int(emb.embedding_dim)
    except (AttributeError, NotImplementedError):
        pass
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def discover(model: nn.Module, exclude: dict[str, str] | None = None) -> Structure | None:
    """The model's attachable structure; None if it has no decoder-layer list. ``exclude``: short
    linear names that are never targets, with the reason (the per-architecture exceptions)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", None))
    found = find_layers(model)
    if found is None:
        return None
    layers_path, layers = found
    st = Structure(model_type, type(model).__name__, layers_path, len(layers), _hidden_size(model))
    prefix = layers_path + "."
    skip: list[str] = []  # subtrees of packed experts: nothing inside is a dense target
    candidates: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if not path.startswith(prefix) or any(path.startswith(s + ".") for s in skip):
            continue
        if path.count(".") > prefix.count(".") and _is_experts_candidate(path, module) \
                and not isinstance(module, nn.Linear):
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                st.experts[path] = ExpertsInfo(path, module, len(module), packed=False)
                continue
            if not any(True for _ in module.parameters()):
                continue
            st.experts[path] = ExpertsInfo(path, module, _num_experts(module, config), packed=True,
                                           problem=_experts_problem(module))
            skip.append(path)
            continue
        if isinstance(module, nn.Linear):
            candidates[path] = module
    # routers / gates: structural, per MoE block (the experts' parent)
    for epath, info in st.experts.items():
        block = epath.rsplit(".", 1)[0]
        E = info.num_experts
        for path, lin in candidates.items():
            if not path.startswith(block + ".") or path.startswith(epath + "."):
                continue
            parent = path.rsplit(".", 1)[0]
            lone = parent == block or sum(
                1 for p in candidates if p.startswith(parent + ".")
            ) == 1
            to_router = lin.out_features == 1 or (E is not None and lin.out_features == E)
            if lone and to_router and (st.hidden_size is None or lin.in_features == st.hidden_size):
                st.routers[path] = (
                    f"{'gate to 1 output' if lin.out_features == 1 else f'router to the {E} experts'} "
                    f"of {epath}"
                )
    for path in candidates:
        short = path.rsplit(".", 1)[-1]
        if exclude and short in exclude and path not in st.routers:
            st.excluded[path] = exclude[short]
    st.linears = {p: m for p, m in candidates.items() if p not in st.routers and p not in st.excluded}
    return st
