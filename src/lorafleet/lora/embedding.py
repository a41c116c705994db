"""`MultiLoRAEmbedding`: a frozen ``nn.Embedding`` plus one embedding LoRA per slot, routed per row.

Matches PEFT 0.21's ``lora.Embedding`` (``peft/tuners/lora/layer.py``): per slot
``lora_embedding_A[r, num_embeddings]`` and ``lora_embedding_B[embedding_dim, r]``, and
``out = E[x] + scale * A.T[x] @ B.T`` (times the base's ``embed_scale`` when it has one, as
Gemma's scaled embeddings do). No dropout on embeddings (PEFT's Embedding never applies its
dropout module). PEFT's default init is the reverse of a linear's: A zeros, B normal.

Attached by the fleet on demand (`models.attach.attach_vocab`, target ``"embed_tokens"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import SlotBank, init_slot_layer
from .routing import current_routing


def peft_embedding_init(rank: int, num_embeddings: int, embedding_dim: int, generator, dtype, device):
    """PEFT's default (``init_lora_weights=True``) embedding init: A zeros, B standard normal."""
    a = torch.zeros(rank, num_embeddings, dtype=dtype, device=device)
    b = torch.randn(embedding_dim, rank, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return a, b


class MultiLoRAEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, bank: SlotBank, path: str, dtype=None):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"{path}: embedding LoRA needs an nn.Embedding, got {type(base).__name__}")
        if base.sparse:
            raise ValueError(f"{path}: embedding LoRA does not support sparse=True embeddings")
        self.lora_embedding_A, self.lora_embedding_B = init_slot_layer(
            self, base, bank, path, base.num_embeddings, base.embedding_dim, dtype)

    @property
    def num_embeddings(self):
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self):
        return self.base_layer.embedding_dim

    @property
    def weight(self):  # tied-weight and dtype checks read the base table
        return self.base_layer.weight

    def _embed_scale(self):
        scale = getattr(self.base_layer, "embed_scale", None)  # e.g. Gemma3TextScaledWordEmbedding
        return scale if isinstance(scale, torch.Tensor) or isinstance(scale, (int, float)) else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        routing = current_routing()
        if routing is None:
            return y
        flat = ids.reshape(-1)
        segs = [(s, a, b) for s, a, b in routing.segments(flat.shape[0], self.path) if self.enabled[s]]
        if not segs:
            return y
        base = self.base_layer
        delta = torch.zeros(flat.shape[0], base.embedding_dim, dtype=self.lora_embedding_B.dtype, device=y.device)
        pieces, at = [], 0
        for slot, start, end in segs:
            info = self.bank.info(slot)
            r = info.rank
            a_t = self.lora_embedding_A[slot, :r].T  # [num_embeddings, r], as PEFT's embedding_A
            after_a = F.embedding(flat[start:end], a_t, padding_idx=base.padding_idx, max_norm=base.max_norm,
                                  norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq)
            out = (after_a @ self.lora_embedding_B[slot, :, :r].T) * self.scale_override.get(slot, info.scale)
            if start > at:
                pieces.append(delta[at:start])
            pieces.append(out)
            at = end
        if at < flat.shape[0]:
            pieces.append(delta[at:])
        delta = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        scale = self._embed_scale()
        if scale is not None:
            delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
        return y + delta.view(*y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"path={self.path}, slots={self.bank.max_adapters}, max_rank={self.bank.max_rank}"
