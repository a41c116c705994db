"""`AdapterWeights`: one adapter's factors, detached from any slot.

This is the exchange format between the slot bank (`Fleet`) and the file formats
(`adapters/formats.py`): the fleet reads a slot into it for export and writes one into a slot
on import; the formats never touch slots.

Conventions (independent of how the base model stores its weights):
- dense module ``path`` (e.g. ``"model.layers.0.self_attn.q_proj"``):
  ``A [r, in]``, ``B [out, r]``, update ``scale * x @ A.T @ B.T``.
- experts module ``path`` (e.g. ``"model.layers.0.mlp.experts"``), per projection
  ``"gate_up"`` (in = hidden, out = 2·intermediate, output rows in the base weight's own order:
  gate then up, or interleaved for GPT-OSS) and ``"down"`` (in = intermediate, out = hidden):
  ``A [E_A, r, in]`` and ``B [E_B, out, r]`` where ``E_A`` / ``E_B`` is 1 for a factor shared by
  all experts and ``E`` otherwise (``"none"``: both E; ``"shared_a"``: A 1; ``"shared_outer"``:
  gate_up A 1 and down B 1).
- the LM head (PEFT target ``"lm_head"``) is a dense module like any linear: ``A [r, H]``,
  ``B [V, r]``.
- input embedding ``path`` (e.g. ``"model.embed_tokens"``, PEFT target ``"embed_tokens"``), PEFT's
  ``lora.Embedding`` layout: ``A [r, V]``, ``B [D, r]``, update ``scale * A.T[ids] @ B.T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import AdapterConfig


@dataclass
class ExpertsArch:
    """What a format needs to know about one experts module of the base model."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    interleaved_gate_up: bool = False  # GPT-OSS: even rows gate, odd rows up


@dataclass
class AdapterWeights:
    config: AdapterConfig
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # base weights a PEFT file carries for its embedding / LM head LoRA (``...base_layer.weight``,
    # PEFT's save_embedding_layers): read on import only, checked against the fleet's base
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    # facts about the base model the formats need (filled by the fleet)
    model_type: str = ""
    base_model_name_or_path: str = ""
    experts_arch: dict[str, ExpertsArch] = field(default_factory=dict)
    layers_path: str = "model.layers"  # where the decoder layers are (PEFT's layers_pattern)
    # out_features of every base linear that can carry LoRA, targeted or not (path -> int): the
    # `sglang` export writes zero LoRA for the untargeted q/k/v and gate/up partners SGLang stacks
    linear_out_features: dict[str, int] = field(default_factory=dict)

    def tensors(self):
        """Yield (key, tensor) for every factor; keys are stable and unique."""
        for path, (a, b) in self.dense.items():
            yield f"{path}.A", a
            yield f"{path}.B", b
        for path, projs in self.experts.items():
            for proj, (a, b) in projs.items():
                yield f"{path}.{proj}.A", a
                yield f"{path}.{proj}.B", b
        for path, (a, b) in self.embeddings.items():
            yield f"{path}.A", a
            yield f"{path}.B", b
