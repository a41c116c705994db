"""LoRA on embed_tokens and lm_head attached by the fleet (issue 13), against PEFT 0.21 alone.

A mixed batch of adapter "e" (embed_tokens + lm_head + q_proj), adapter "q" (q_proj only) and
base rows: each adapter's loss and LoRA gradients equal PEFT's for that adapter alone (the
chunked loss adds the head LoRA per run of rows); AdamW steps equal PEFT + torch AdamW; files go
both ways; greedy sampling equals PEFT's; a tied-embedding base; every refusal names its cause.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import lorafleet as lf
from lorafleet.lora import MultiLoRAEmbedding, MultiLoRALinear
from lorafleet.models.debug import build_debug_model
from peft_ref import fleet_grads, peft_alone, peft_grads, quiet_peft_warnings, randomize, rel  # noqa: F401

TOL = 1e-5
VOCAB_CFG = lf.AdapterConfig(rank=4, alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], seed=3)
Q_CFG = lf.AdapterConfig(rank=2, alpha=6, target_modules=["q_proj"], seed=4)
_BASES: dict[tuple, torch.nn.Module] = {}


def base(arch="llama", **overrides):
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _BASES:
        _BASES[key] = build_debug_model(arch, seed=0, **overrides)
    return copy.deepcopy(_BASES[key])


def examples(adapter, seed, n=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(4, 8, (1,), generator=g))
        toks = torch.randint(1, 256, (L + 1,), generator=g).tolist()
        w = (torch.rand(L, generator=g) * 2 - 0.5).tolist()
        out.append(lf.Example(adapter, toks[:-1], toks[1:], w))
    return out


def peft_loss(model, batch):
    total = 0
    for ex in batch:
        logits = model(input_ids=torch.tensor([ex.input_tokens])).logits[0].float()
        lp = F.log_softmax(logits, -1).gather(1, torch.tensor(ex.target_tokens)[:, None]).squeeze(1)
        total = total - (lp * torch.tensor(ex.weights)).sum()
    return total


def two_adapter_fleet(b, checkpointing=False):
    fleet = lf.Fleet(copy.deepcopy(b), max_adapters=3, max_rank=8)
    if checkpointing:
        fleet.model.gradient_checkpointing_enable()
    fleet.add_adapter("e", VOCAB_CFG)
    fleet.add_adapter("q", Q_CFG)
    randomize(fleet, "e", 1)
    randomize(fleet, "q", 2)
    return fleet


def test_lazy_banks_init_and_views():
    fleet = lf.Fleet(base(), max_adapters=2, max_rank=8)
    assert not isinstance(fleet.model.lm_head, MultiLoRALinear)  # no adapter asked: no vocab-sized bank
    fleet.add_adapter("q", Q_CFG)
    assert not isinstance(fleet.model.model.embed_tokens, MultiLoRAEmbedding)
    fleet.add_adapter("e", VOCAB_CFG)
    head, emb = fleet.model.lm_head, fleet.model.model.embed_tokens
    assert isinstance(head, MultiLoRALinear) and isinstance(emb, MultiLoRAEmbedding)
    assert "lm_head" not in fleet.linear_names  # never part of "all-linear", as in PEFT
    slot = fleet.slot_of("e")
    # PEFT's inits: lm_head like a linear (A Kaiming, B zero), the embedding reversed (A zero, B normal)
    assert head.lora_A[slot, :4].abs().sum() > 0 and head.lora_B[slot].abs().sum() == 0
    assert emb.lora_embedding_A[slot].abs().sum() == 0 and emb.lora_embedding_B[slot, :, :4].abs().sum() > 0
    assert emb.lora_embedding_B[slot, :, 4:].abs().sum() == 0
    keys = [k for k, _, _ in fleet.adapter_views("e")]
    assert {"lm_head.A", "lm_head.B", "model.embed_tokens.A", "model.embed_tokens.B"} <= set(keys)
    assert not any("lm_head" in k or "embed" in k for k, _, _ in fleet.adapter_views("q"))
    ids = torch.randint(0, 256, (2, 5))  # a fresh adapter (zero head B, zero embedding A) is the base
    with torch.no_grad():
        assert torch.equal(fleet.forward(ids, adapters=["e", "e"]).logits, fleet.forward(ids).logits)
    fleet.remove_adapter("e")
    assert head.lora_A[slot].abs().sum() == 0 and emb.lora_embedding_B[slot].abs().sum() == 0
    fleet.detach()  # the original modules come back
    assert type(fleet.model.lm_head) is torch.nn.Linear and type(fleet.model.model.embed_tokens) is torch.nn.Embedding


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mixed_batch_loss_and_grads_equal_peft_alone(tmp_path, checkpointing):
    b = base()
    fleet = two_adapter_fleet(b, checkpointing)
    be, bq = examples("e", 10), examples("q", 11)
    base_rows = [lf.Example(None, ex.input_tokens, ex.target_tokens) for ex in examples("e", 12, n=1)]
    res = fleet.forward_backward([be[0], bq[0], be[1], bq[1]])
    fwd = fleet.forward_backward(be + bq + base_rows, forward_only=True)
    for name, batch in (("e", be), ("q", bq)):
        ref = peft_alone(b, fleet, name, tmp_path)
        loss = peft_loss(ref, batch)
        loss.backward()
        assert abs(res.metrics[name]["loss:sum"] - loss.item()) <= TOL * abs(loss.item())
        assert abs(fwd.metrics[name]["loss:sum"] - loss.item()) <= TOL * abs(loss.item())
        theirs, ours = peft_grads(ref, fleet, name), fleet_grads(fleet, name)
        assert set(theirs) == set(ours)
        for k in ours:
            assert rel(ours[k], theirs[k]) <= TOL, k
        if name == "e":
            assert ours["lm_head.B"].abs().sum() > 0 and ours["model.embed_tokens.A"].abs().sum() > 0


def test_adamw_steps_equal_peft_with_torch_adamw(tmp_path):
    b = base()
    fleet = two_adapter_fleet(b)
    opt_cfg = lf.OptimConfig(lr=5e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    fleet.set_optimizer("e", opt_cfg)
    fleet.set_optimizer("q", opt_cfg)
    ref = peft_alone(b, fleet, "e", tmp_path)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
    for step in range(3):
        be, bq = examples("e", 20 + step), examples("q", 30 + step)
        fleet.forward_backward(be + bq)
        fleet.optim_step()
        peft_loss(ref, be).backward()
        opt.step()
        opt.zero_grad()
    ref.eval()
    moved = {n: p.detach().clone() for n, p in ref.named_parameters() if "lora_" in n}
    again = peft_alone(b, fleet, "e", tmp_path)
    reloaded = dict(again.named_parameters())
    assert any("lora_embedding_A" in n for n in moved) and any("lm_head.lora_B" in n for n in moved)
    for n, p in moved.items():
        assert rel(reloaded[n], p) <= TOL, n


def _peft_vocab_adapter(b, tmp_path, **extra):
    pm = get_peft_model(copy.deepcopy(b), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head",
                                                                                          "q_proj"], **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    out = tmp_path / "peft_vocab"
    pm.save_pretrained(out)  # also writes embed_tokens / lm_head base_layer.weight (save_embedding_layers)
    return pm, out


def test_peft_file_loads_with_equal_logits_and_greedy_samples(tmp_path):
    b = base()
    pm, d = _peft_vocab_adapter(b, tmp_path)
    keys = load_file(str(d / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.base_layer.weight" in keys
    fleet = lf.Fleet(copy.deepcopy(b), max_adapters=2, max_rank=8)
    fleet.load_adapter("p", d)
    fleet.add_adapter("q", Q_CFG)
    randomize(fleet, "q", 5)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = fleet.forward(ids, adapters=["q", "p", None]).logits
        theirs = pm(input_ids=ids[1:2]).logits
    assert rel(ours[1:2], theirs) <= TOL
    # greedy: PEFT's argmax loop vs the fleet's sampler, next to another adapter's request
    prompt = ids[1, :4].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(pm(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    got = fleet.sample([lf.SampleRequest("q", ids[0, :3].tolist()), lf.SampleRequest("p", prompt)],
                       lf.SamplingParams(max_tokens=6, temperature=0.0, stop_on_eos=False))
    assert got[1][0].tokens == seq[len(prompt):]


def test_tied_embeddings_are_separate_deltas_as_in_peft(tmp_path):
    """PEFT 0.21 (ensure_weight_tying=False, its default) gives embed_tokens and lm_head their own
    LoRA even when the base weights are tied; the fleet does the same."""
    b = base(tie_word_embeddings=True)
    assert b.lm_head.weight is b.model.embed_tokens.weight
    fleet = lf.Fleet(copy.deepcopy(b), max_adapters=2, max_rank=8)
    fleet.add_adapter("e", VOCAB_CFG)
    randomize(fleet, "e", 7)
    assert fleet.model.lm_head.weight is fleet.model.model.embed_tokens.weight
    batch = examples("e", 40)
    res = fleet.forward_backward(batch)
    ref = peft_alone(b, fleet, "e", tmp_path)
    loss = peft_loss(ref, batch)
    loss.backward()
    assert abs(res.metrics["e"]["loss:sum"] - loss.item()) <= TOL * abs(loss.item())
    theirs, ours = peft_grads(ref, fleet, "e"), fleet_grads(fleet, "e")
    for k in ours:
        assert rel(ours[k], theirs[k]) <= TOL, k
    assert fleet.model.lm_head.weight.grad is None  # the tied base stays frozen


def test_state_round_trip_and_engine_exports(tmp_path):
    b = base()
    fleet = two_adapter_fleet(b)
    fleet.set_optimizer("e", lf.OptimConfig(lr=1e-3))
    fleet.forward_backward(examples("e", 50))
    fleet.optim_step()
    fleet.save_state("e", tmp_path / "st")
    other = lf.Fleet(copy.deepcopy(b), max_adapters=2, max_rank=8)  # banks attach at load_state
    other.load_state("e", tmp_path / "st")
    for (k, t), (k2, t2) in zip(fleet.get_adapter_weights("e").tensors(), other.get_adapter_weights("e").tensors()):
        assert k == k2 and torch.equal(t, t2)
    fleet.save_adapter("e", tmp_path / "vllm", format="vllm")  # vLLM 0.32's Llama loads embedding / lm_head LoRA
    keys = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    with pytest.raises(ValueError, match="sglang.*embed_tokens"):
        fleet.save_adapter("e", tmp_path / "sg", format="sglang")


def test_refusals_name_the_problem(tmp_path):
    b = base()
    fleet = lf.Fleet(copy.deepcopy(b), max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="layers_to_transform"):
        fleet.add_adapter("x", VOCAB_CFG.with_(layers_to_transform=[0]))
    with pytest.raises(ValueError, match="unknown target module.*wte"):
        fleet.add_adapter("x", lf.AdapterConfig(target_modules=["wte"]))
    assert not fleet.adapters
    _, d = _peft_vocab_adapter(b, tmp_path)
    # a file whose saved base embedding differs from this base (e.g. retrained new-token rows)
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.model.embed_tokens.base_layer.weight"] = t[
        "base_model.model.model.embed_tokens.base_layer.weight"] + 1
    bad = tmp_path / "bad_base"
    bad.mkdir()
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="embed_tokens.base_layer.weight.*differs"):
        fleet.load_adapter("x", bad)
    for field, value, match in (("ensure_weight_tying", True, "ensure_weight_tying"),
                                ("modules_to_save", ["lm_head"], "modules_to_save.*embed_tokens")):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg[field] = value
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(load_file(str(d / "adapter_model.safetensors")), str(bad / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=match):
            fleet.load_adapter("x", bad)
    assert not fleet.adapters
    # vLLM's Qwen2 declares no embedding_modules: a vLLM export would silently lose the deltas
    q2 = lf.Fleet(base("qwen2"), max_adapters=1, max_rank=8)
    q2.add_adapter("e", VOCAB_CFG)
    with pytest.raises(ValueError, match="vllm.*model.embed_tokens.*qwen2"):
        q2.save_adapter("e", tmp_path / "q2", format="vllm")


def test_head_lora_dropout_in_the_chunked_loss():
    """lora_dropout on the head LoRA (PEFT: lora_B(lora_A(dropout(h)))) acts in forward_backward's
    training forward only, with masks from the adapter's seed: reproducible, absent in forward_only."""
    cfg = lf.AdapterConfig(rank=4, alpha=8, target_modules=["lm_head"], lora_dropout=0.5, seed=2)
    losses = []
    for _ in range(2):
        fleet = lf.Fleet(base(), max_adapters=2, max_rank=8)
        fleet.add_adapter("d", cfg)
        randomize(fleet, "d", 3, std=1.0)
        batch = examples("d", 60)
        plain = fleet.forward_backward(batch, forward_only=True).metrics["d"]["loss:sum"]
        dropped = fleet.forward_backward(batch).metrics["d"]["loss:sum"]
        grads = fleet_grads(fleet, "d")
        assert all(torch.isfinite(g).all() for g in grads.values()) and grads["lm_head.A"].abs().sum() > 0
        losses.append((plain, dropped))
    assert losses[0] == losses[1]  # same seed, same masks
    assert abs(losses[0][0] - losses[0][1]) > 1e-3 * abs(losses[0][0])


def test_bf16_chunked_head_lora_matches_the_full_model_forward():
    """The chunked loss's head LoRA (training path) and the wrapped head module (Fleet.forward,
    sampling) agree in a bf16 fleet (rel. 1e-2)."""
    fleet = lf.Fleet(build_debug_model("qwen3", seed=0, dtype=torch.bfloat16), max_adapters=2, max_rank=8)
    assert fleet.vocab_names == ["embed_tokens", "lm_head"]
    fleet.add_adapter("e", VOCAB_CFG)
    randomize(fleet, "e", 1)
    ex = examples("e", 70, n=1)[0]
    chunked = fleet.forward_backward([lf.Example("e", ex.input_tokens, ex.target_tokens)], forward_only=True)
    with torch.no_grad():
        logits = fleet.forward(torch.tensor([ex.input_tokens]), adapters=["e"]).logits[0].float()
    full = logits.log_softmax(-1).gather(1, torch.tensor(ex.target_tokens)[:, None]).squeeze(1)
    assert rel(torch.tensor(chunked.logprobs[0]), full) <= 1e-2
    with torch.no_grad():
        base_logits = fleet.forward(torch.tensor([ex.input_tokens])).logits[0].float()
    assert rel(base_logits.log_softmax(-1).gather(1, torch.tensor(ex.target_tokens)[:, None]).squeeze(1), full) > 0.05
