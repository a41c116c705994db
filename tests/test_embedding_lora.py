"""MultiLoRAEmbedding vs PEFT 0.21's lora.Embedding: a mixed batch (two adapters and base rows)
equals each adapter alone in PEFT, for outputs and gradients of A and B."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafleet.lora import Routing, SlotBank, SlotInfo, use_routing
from lorafleet.lora.embedding import MultiLoRAEmbedding


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16, padding_idx=0)

    def forward(self, ids):
        return self.embed_tokens(ids)


ADAPTERS = [dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=6, use_rslora=True)]


def _peft_alone(base, cfg, seed):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["embed_tokens"], **cfg))
    layer = model.base_model.model.embed_tokens
    with torch.no_grad():  # PEFT inits A to zeros: give both factors values so gradients are informative
        layer.lora_embedding_A["default"].normal_()
    return model, layer


def test_mixed_batch_matches_peft_each_adapter_alone():
    torch.manual_seed(0)
    base = Tok().double()
    bank = SlotBank(max_adapters=3, max_rank=4)
    fleet_layer = MultiLoRAEmbedding(base.embed_tokens, bank, "model.embed_tokens")
    peft = []
    for slot, cfg in enumerate(ADAPTERS):
        model, layer = _peft_alone(base, cfg, seed=slot + 1)
        peft.append((model, layer))
        r = cfg["r"]
        bank.slots[slot] = SlotInfo(f"a{slot}", r, layer.scaling["default"], False, "none")
        fleet_layer.enabled[slot] = True
        with torch.no_grad():
            fleet_layer.lora_embedding_A[slot, :r] = layer.lora_embedding_A["default"]
            fleet_layer.lora_embedding_B[slot, :, :r] = layer.lora_embedding_B["default"]
    ids = torch.randint(0, 50, (5, 7))
    ids[0, 0] = 0  # a padding token: PEFT's F.embedding sees padding_idx too
    row_slots = [0, 0, 1, 1, -1]
    with use_routing(Routing.from_row_slots(row_slots, ids.device)):
        out = fleet_layer(ids)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    for slot, (model, layer) in enumerate(peft):
        rows = [i for i, s in enumerate(row_slots) if s == slot]
        ref = model(ids[rows])
        (ref * weights[rows]).sum().backward()
        assert torch.allclose(out[rows], ref, rtol=0, atol=1e-12)
        r = ADAPTERS[slot]["r"]
        ga = fleet_layer.lora_embedding_A.grad[slot, :r]
        gb = fleet_layer.lora_embedding_B.grad[slot, :, :r]
        ref_ga = layer.lora_embedding_A["default"].grad
        ref_gb = layer.lora_embedding_B["default"].grad
        assert (ga - ref_ga).norm() / ref_ga.norm() <= 1e-10
        assert (gb - ref_gb).norm() / ref_gb.norm() <= 1e-10
    base_rows = [4]
    assert torch.equal(out[base_rows], base.embed_tokens(ids[base_rows]))
    # unused rank columns of a smaller adapter's slot get no gradient
    assert fleet_layer.lora_embedding_A.grad[1, 2:].abs().sum() == 0


def test_no_routing_is_the_base_embedding_and_bad_base_refused():
    base = Tok()
    bank = SlotBank(max_adapters=1, max_rank=2)
    layer = MultiLoRAEmbedding(base.embed_tokens, bank, "model.embed_tokens")
    ids = torch.randint(0, 50, (2, 3))
    assert torch.equal(layer(ids), base.embed_tokens(ids))
    with pytest.raises(ValueError, match="needs an nn.Embedding"):
        MultiLoRAEmbedding(nn.Linear(3, 3), bank, "lm_head")
