"""Swap every targetable linear for a `MultiLoRALinear` and every packed experts module for a
`MultiLoRAExperts`, in place; `Attachment.detach()` puts the originals back."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..lora import MultiLoRAExperts, MultiLoRALinear, SlotBank
from .registry import ArchSpec


def _is_packed_experts(module: nn.Module) -> bool:
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(up, nn.Parameter) and up.dim() == 3
        and isinstance(down, nn.Parameter) and down.dim() == 3
    )


@dataclass
class Attachment:
    model: nn.Module
    linears: dict[str, MultiLoRALinear] = field(default_factory=dict)
    experts: dict[str, MultiLoRAExperts] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _requires_grad: dict[str, bool] = field(default_factory=dict)

    @property
    def linear_names(self) -> set[str]:
        return {m.short_name for m in self.linears.values()}

    def lora_modules(self):
        yield from self.linears.values()
        yield from self.experts.values()

    def detach(self):
        for parent, child_name, original in reversed(self._originals):
            setattr(parent, child_name, original)
        self._originals.clear()
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])


def attach(model: nn.Module, spec: ArchSpec, bank: SlotBank, experts: bool = True, dtype=None) -> Attachment:
    att = Attachment(model)
    att._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # the base stays frozen: only slot tensors train
        p.requires_grad_(False)
    layers_prefix = "model.layers."
    todo = []
    for path, module in model.named_modules():
        if not path.startswith(layers_prefix):
            continue
        short = path.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and short not in spec.router_linears:
            todo.append((path, module, "linear"))
        elif experts and spec.moe and _is_packed_experts(module):
            todo.append((path, module, "experts"))
    for path, module, kind in todo:
        parent_path, child_name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if kind == "linear":
            wrapped = MultiLoRALinear(module, bank, path, dtype=dtype)
            att.linears[path] = wrapped
        else:
            if not hasattr(module, "_apply_gate") and getattr(module, "has_gate", True):
                raise ValueError(
                    f"{path} ({type(module).__name__}) has packed experts but no `_apply_gate`: "
                    "lorafleet needs the transformers>=5 `use_experts_implementation` experts class"
                )
            wrapped = MultiLoRAExperts(module, bank, path, dtype=dtype)
            att.experts[path] = wrapped
        setattr(parent, child_name, wrapped)
        att._originals.append((parent, child_name, module))
    if spec.moe and experts and not att.experts:
        raise ValueError(
            f"{spec.model_type}: found no packed experts module (3D gate_up_proj/down_proj) under "
            f"{layers_prefix}*; is this a transformers<5 checkpoint layout?"
        )
    return att
