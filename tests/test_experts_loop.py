"""MultiLoRAExperts against a plain per-token, per-expert torch loop, for every expert-sharing mode
at once (several slots in one call), on concatenated (Qwen3-MoE) and interleaved/transposed/biased
(GPT-OSS) experts: outputs and all LoRA gradients."""

import pytest
import torch

from lorafleet.lora import MultiLoRAExperts, Routing, SlotBank, SlotInfo, use_routing
from lorafleet.lora.experts import SHARED_FACTORS
from lorafleet.models.debug import build_debug_model


def plain_loop(m: MultiLoRAExperts, x, top_k_index, top_k_weights, token_slot):
    """For every token t and each of its k experts e: run expert e with W_e + Σ its slot's ΔW_e
    written out factor by factor, weight by the router weight and sum."""
    base = m.base_layer
    out = []
    for t in range(x.shape[0]):
        acc = 0
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            W_gu = base.gate_up_proj[e].t() if m.transposed else base.gate_up_proj[e]  # [2I, H]
            W_d = base.down_proj[e].t() if m.transposed else base.down_proj[e]  # [H, I]
            h = W_gu @ x[t]
            if m.has_bias:
                h = h + base.gate_up_proj_bias[e]
            s = int(token_slot[t])
            if s >= 0 and m.enabled[s]:
                info = m.bank.info(s)
                r, sc = info.rank, info.scale
                ga, gb, da, db = SHARED_FACTORS[info.expert_sharing]
                (_, gA, iA), (_, gB, iB), (_, dA, jA), (_, dB, jB) = m.factor_views(s, r, info.expert_sharing)
                A = gA[iA][0 if ga else e]
                B = gB[iB][0 if gb else e]
                h = h + sc * (B @ (A @ x[t]))
            act = base._apply_gate(h[None])[0]
            o = W_d @ act
            if m.has_bias:
                o = o + base.down_proj_bias[e]
            if s >= 0 and m.enabled[s]:
                A = dA[jA][0 if da else e]
                B = dB[jB][0 if db else e]
                o = o + sc * (B @ (A @ act))
            acc = acc + top_k_weights[t, k] * o
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_experts_match_plain_loop_all_modes(arch):
    torch.manual_seed(0)
    model = build_debug_model(arch, seed=0)
    experts = model.model.layers[0].mlp.experts
    bank = SlotBank(max_adapters=4, max_rank=6)
    m = MultiLoRAExperts(experts, bank, "layer0.experts")
    modes = {0: ("none", 6), 1: ("shared_a", 3), 2: ("shared_outer", 4)}  # slot 3 stays empty
    for s, (mode, r) in modes.items():
        bank.slots[s] = SlotInfo(f"a{s}", r, 1.5 + s, True, mode)
        m.assign_slot(s, mode)
        m.enabled[s] = True
    m.assign_slot(3, "none")  # rows of a slot no routed token uses: they must get no gradient
    with torch.no_grad():  # rank padding is filled too: neither side may read it
        for p in (m.gate_up_A, m.gate_up_B, m.down_A, m.down_B):
            p.normal_(std=0.2)
    rows = [-1, 0, 0, 1, 2, 2, 2]  # adapter-major, one base row first
    T, E, K = 3, experts.num_experts, 2
    N = len(rows) * T
    x = torch.randn(N, model.config.hidden_size, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    top_k_weights = torch.softmax(torch.randn(N, K), -1)
    routing = Routing.from_row_slots(rows, x.device)
    with use_routing(routing):
        ours = m(x, top_k_index, top_k_weights)
    gy = torch.randn_like(ours)
    ours.backward(gy)
    grads = {n: p.grad.clone() for n, p in m.named_parameters(recurse=False)}
    gx = x.grad.clone()
    for p in m.parameters():
        p.grad = None
    x.grad = None
    ref = plain_loop(m, x, top_k_index, top_k_weights, routing.token_slot(N))
    ref.backward(gy)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(ours, ref) < 1e-5 and rel(gx, x.grad) < 1e-5
    for n, p in m.named_parameters(recurse=False):
        assert rel(grads[n], p.grad) < 1e-5, n
        assert m.slot_part(n, grads[n], 3).abs().sum() == 0  # the empty slot
