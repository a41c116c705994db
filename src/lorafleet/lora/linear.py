"""`MultiLoRALinear`: a frozen ``nn.Linear`` plus one LoRA per slot, routed per token."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.dispatch import Segment
from .bank import SlotBank, init_slot_layer
from .routing import current_routing


def kaiming_uniform_A(shape, generator, dtype, device):
    """PEFT/nn.Linear default init for lora_A (kaiming_uniform with a=sqrt(5))."""
    fan_in = shape[-1]
    bound = 1.0 / math.sqrt(fan_in)  # gain(sqrt 5) * sqrt(3 / fan_in) == 1 / sqrt(fan_in)
    t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return t.to(device=device, dtype=dtype)


def dropout_noise(shape, p: float, seed: int, counter: int, path: str, dtype, device) -> torch.Tensor:
    """nn.Dropout's multiplier for one adapter's tokens at one layer: 0 with probability ``p``,
    else ``1 / (1 - p)`` (computed as ``F.dropout`` does: a Bernoulli(1 - p) mask divided by
    1 - p). Drawn from a generator seeded by (adapter seed, forward counter, layer path) only:
    the same for a recompute, and independent of the other adapters in the batch."""
    h = hashlib.blake2b(f"{seed}:{counter}:{path}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") & (2**63 - 1))
    keep = torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= p
    return keep.to(dtype).div_(1.0 - p)


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, bank: SlotBank, path: str, dtype=None):
        super().__init__()
        self.lora_A, self.lora_B = init_slot_layer(self, base, bank, path, base.in_features, base.out_features, dtype)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):  # code that peeks at ``.weight`` (dtype/device checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def segments(self, routing, num_tokens: int) -> list[Segment]:
        segs = []
        for slot, start, end in routing.segments(num_tokens, self.path):
            if self.enabled[slot]:
                info = self.bank.info(slot)
                segs.append(Segment(start, end, slot, slot, info.rank, self.scale_override.get(slot, info.scale)))
        return segs

    def _fusable(self, x: torch.Tensor) -> bool:
        """May the base GEMM and the LoRA run as one op (``dispatch.lora_linear``)? Only for a
        plain, hook-free, frozen ``nn.Linear`` of the LoRA's dtype on the Triton backend."""
        base = self.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return False
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        same = x.dtype == base.weight.dtype == self.lora_A.dtype
        return frozen and same and dispatch.backend(self.lora_A) == "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        if routing is None:
            return self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])
        segs = self.segments(routing, flat.shape[0])
        if not segs:
            return self.base_layer(x)
        # the fleet puts dropout in the routing only for a training forward (Fleet._dropout_plan);
        # reading it from there, not from self.training, keeps a checkpoint recompute in backward exact
        drop = routing.dropout
        if any(s.a_index in drop for s in segs):  # PEFT: lora_B(lora_A(dropout(x))); the base sees x
            return self._forward_dropout(x, flat, segs, drop)
        mode = dispatch.fuse_base()
        if mode != "off" and self._fusable(flat):
            base = self.base_layer
            y = dispatch.lora_linear(flat, base.weight, base.bias, self.lora_A, self.lora_B, segs, mode)
            return y.view(*x.shape[:-1], -1)
        y = self.base_layer(x)
        delta = dispatch.segment_lora(flat, self.lora_A, self.lora_B, segs)
        return y + delta.view(*y.shape[:-1], -1).to(y.dtype)

    def _forward_dropout(self, x, flat, segs, drop):
        """Unfused: the LoRA input of each dropping segment is ``x * dropout_noise`` (the others'
        is ``x``)."""
        pieces, at = [], 0
        for s in segs:
            if s.a_index in drop:
                p, seed, counter = drop[s.a_index]
                if s.start > at:
                    pieces.append(flat[at:s.start])
                seg = flat[s.start:s.end]
                pieces.append(seg * dropout_noise(seg.shape, p, seed, counter, self.path, seg.dtype, seg.device))
                at = s.end
        if at < flat.shape[0]:
            pieces.append(flat[at:])
        xd = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        y = self.base_layer(x)
        delta = dispatch.segment_lora(xd, self.lora_A, self.lora_B, segs)
        return y + delta.view(*y.shape[:-1], -1).to(y.dtype)

    def extra_repr(self) -> str:
        return f"path={self.path}, slots={self.bank.max_adapters}, max_rank={self.bank.max_rank}"
