"""A lone `MultiLoRALinear` with random factors, for layer-level tests (no model, no Fleet)."""

import torch

from lorafleet.lora.bank import SlotBank, SlotInfo
from lorafleet.lora.linear import MultiLoRALinear


def random_multilora_linear(in_f: int, out_f: int, slots: dict, num_slots: int, max_rank: int, path: str,
                            device) -> MultiLoRALinear:
    """Frozen ``nn.Linear(in_f, out_f)`` with LoRA on ``slots`` ({slot: (rank, scale)}), factors N(0, 1)."""
    bank = SlotBank(max_adapters=num_slots, max_rank=max_rank)
    for slot, (rank, scale) in slots.items():
        bank.slots[slot] = SlotInfo(f"a{slot}", rank, scale, False, "none")
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(in_f, out_f), bank, path).to(device)
    layer.base_layer.requires_grad_(False)
    layer.enabled = [s in slots for s in range(num_slots)]
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer
