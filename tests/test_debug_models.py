"""Tests for the tiny random-init debug models (lorafleet.models.debug)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import lorafleet.models.debug  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafleet.models.debug import (  # noqa: E402
    DEBUG_ARCHS,
    MOE_ARCHS,
    build_debug_model,
    debug_config,
    describe_debug_model,
    experts_modules,
    router_modules,
)

VOCAB = 256

# What the module docstring table promises: experts path -> {param: shape}, router path.
EXPECTED_EXPERTS = {
    "qwen2_moe": {"gate_up_proj": (8, 48, 64), "down_proj": (8, 64, 24)},
    "deepseek_v3": {"gate_up_proj": (8, 48, 64), "down_proj": (8, 64, 24)},
    "qwen3_moe": {"gate_up_proj": (8, 48, 64), "down_proj": (8, 64, 24)},
    "mixtral": {"gate_up_proj": (8, 48, 64), "down_proj": (8, 64, 24)},
    "olmoe": {"gate_up_proj": (8, 48, 64), "down_proj": (8, 64, 24)},
    "gpt_oss": {
        "gate_up_proj": (8, 64, 48),
        "gate_up_proj_bias": (8, 48),
        "down_proj": (8, 24, 64),
        "down_proj_bias": (8, 64),
    },
}
EXPECTED_ROUTER = {a: "mlp.gate" for a in MOE_ARCHS} | {"gpt_oss": "mlp.router"}
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED_LINEARS = {
    "llama": ATTN + DENSE_MLP,
    "qwen2": ATTN + DENSE_MLP,
    "qwen3": ATTN + DENSE_MLP,
    "qwen2_moe": ATTN
    + (
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate",
    ),
    "deepseek_v3": (
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
    )
    + DENSE_MLP
    + ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
    "qwen3_moe": ATTN,
    "mixtral": ATTN,
    "olmoe": ATTN,
    "gpt_oss": ATTN,
}
N_MOE_LAYERS = {a: 2 for a in MOE_ARCHS}


_CACHE: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    """Shared eval-mode model per arch; tests that mutate a model build their own."""
    if name not in _CACHE:
        _CACHE[name] = build_debug_model(name)
    return _CACHE[name]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids[mask == 0] = 0  # pad_token_id
    return ids, mask


def test_arch_lists():
    assert len(DEBUG_ARCHS) == 9 and len(set(DEBUG_ARCHS)) == 9
    assert DEBUG_ARCHS[:3] == ("llama", "qwen2", "qwen3")
    assert set(MOE_ARCHS) == set(DEBUG_ARCHS[3:])


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_builds_with_debug_sizes(name):
    model = _model(name)
    cfg = model.config
    assert not model.training
    assert cfg.vocab_size >= 256 and cfg.hidden_size == 64 and cfg.num_attention_heads == 4
    assert cfg.num_hidden_layers == (3 if name == "deepseek_v3" else 2)
    assert cfg.max_position_embeddings == 512
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert cfg._attn_implementation == "eager"
    assert getattr(cfg, "output_router_logits", False) is False
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert p.abs().max() < 10, n
    if name in MOE_ARCHS:
        assert cfg._experts_implementation == "eager"
    if name not in ("deepseek_v3",):
        attn = model.model.layers[0].self_attn
        assert attn.head_dim == 16
        assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # 2 KV heads


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_module_table(name):
    desc = describe_debug_model(_model(name))
    assert set(desc["linears"]) == set(EXPECTED_LINEARS[name])
    if name in MOE_ARCHS:
        assert desc["experts"] == {"mlp.experts": EXPECTED_EXPERTS[name]}
        assert list(desc["routers"]) == [EXPECTED_ROUTER[name]]
    else:
        assert desc["experts"] == {} and desc["routers"] == {}


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_forward_padded_batch(name):
    model = _model(name)
    ids, mask = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, 7, VOCAB)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0
    assert torch.equal(logits, again)
    # right padding must not change the real positions (causal + mask, no capacity dropping)
    with torch.no_grad():
        alone = model(input_ids=ids[2:3, :5]).logits
    torch.testing.assert_close(logits[2:3, :5], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_same_seed_same_weights(name):
    a = _model(name).state_dict()
    b = build_debug_model(name, seed=0).state_dict()
    c = build_debug_model(name, seed=1).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].std() > 0)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_debug_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", MOE_ARCHS)
def test_moe_params_are_random(name):
    model = _model(name)
    experts = experts_modules(model)
    routers = router_modules(model)
    assert len(experts) == len(routers) == N_MOE_LAYERS[name]
    for mod in list(experts.values()) + list(routers.values()):
        for pname, p in mod.named_parameters(recurse=False):
            assert torch.isfinite(p).all(), pname
            assert 0.005 < p.float().std() < 0.1, pname  # ~N(0, 0.02): not zero, not garbage
    # different experts are different
    e = next(iter(experts.values()))
    assert not torch.equal(e.gate_up_proj[0], e.gate_up_proj[1])


@pytest.mark.parametrize("name", MOE_ARCHS)
def test_moe_routing_spreads_over_experts(name):
    model = _model(name)
    num_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else None
    num_experts = num_experts or model.config.num_experts
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        mod.register_forward_hook(lambda m, i, o, q=q: seen.setdefault(q, []).append(o[2].detach()))
        for q, mod in router_modules(model).items()
    ]
    try:
        ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))  # 32 tokens
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == N_MOE_LAYERS[name]
    for q, calls in seen.items():
        (idx,) = calls
        assert idx.shape == (32, model.config.num_experts_per_tok), q
        assert idx.unique().numel() >= max(2, num_experts // 2), (q, idx.unique())
        assert idx[:, 0].unique().numel() >= 2, q  # top-1 choice is not the same for all tokens


def test_deepseek_v3_structure():
    model = _model("deepseek_v3")
    layers = model.model.layers
    assert not hasattr(layers[0].mlp, "experts")  # first_k_dense_replace=1
    assert all(hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "shared_experts") for layer in layers[1:])
    attn = layers[0].self_attn
    assert attn.q_proj is None and attn.q_a_proj is not None and attn.q_b_proj is not None
    gate = layers[1].mlp.gate
    assert model.config.n_routed_experts % model.config.n_group == 0
    assert model.config.topk_group * (8 // model.config.n_group) >= model.config.num_experts_per_tok
    assert torch.equal(gate.e_score_correction_bias, torch.zeros(8))


def test_gpt_oss_structure():
    model = _model("gpt_oss")
    cfg = model.config
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert cfg.sliding_window is not None and cfg.sliding_window < 7
    assert model.model.layers[0].self_attn.sliding_window == cfg.sliding_window
    assert model.model.layers[1].self_attn.sliding_window is None
    assert model.model.layers[0].self_attn.sinks.shape == (4,)
    assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_gradient_checkpointing_train_backward(name):
    model = build_debug_model(name)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model.train()
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["lm_head.weight"] is not None and grads["lm_head.weight"].abs().sum() > 0
    layer0 = [n for n in grads if n.startswith("model.layers.0.self_attn.") and n.endswith("proj.weight")]
    assert layer0 and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in layer0)
    for n, g in grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), n
    if name in MOE_ARCHS:
        for q, e in experts_modules(model).items():
            assert e.gate_up_proj.grad is not None and e.gate_up_proj.grad.abs().sum() > 0, q
            assert e.down_proj.grad is not None and e.down_proj.grad.abs().sum() > 0, q


@pytest.mark.parametrize("name", DEBUG_ARCHS)
def test_bf16_build(name, tmp_path):
    model = build_debug_model(name, dtype=torch.bfloat16)
    # The oracle is from_pretrained itself: which tensors it keeps in fp32 (the model's
    # _keep_in_fp32_modules_strict) changes between transformers releases (5.24 keeps
    # DeepSeek-V3's router gate.weight in fp32, 5.17 did not), and the build must follow it.
    build_debug_model(name).save_pretrained(tmp_path)
    model_cls = type(model)
    loaded = model_cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    want = {n: p.dtype for n, p in loaded.named_parameters()}
    assert {n: p.dtype for n, p in model.named_parameters()} == want
    # everything outside the kept-in-fp32 modules is bf16 (not a silently fp32 build)
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for n, p in model.named_parameters():
        if not any(k in n for k in keep):
            assert p.dtype == torch.bfloat16, n
    if name == "deepseek_v3":  # _keep_in_fp32_modules_strict, as from_pretrained would do
        assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids, mask = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, 7, VOCAB) and torch.isfinite(logits.float()).all()


def test_overrides():
    cfg = debug_config("qwen3_moe", num_hidden_layers=3, num_experts=4)
    assert cfg.num_hidden_layers == 3 and cfg.num_experts == 4
    model = build_debug_model("llama", num_hidden_layers=1)
    assert len(model.model.layers) == 1
    cfg = debug_config("mixtral", experts_implementation="batched_mm")
    assert cfg._experts_implementation == "batched_mm"


@pytest.mark.parametrize("fn", [debug_config, build_debug_model])
def test_unknown_name_raises(fn):
    with pytest.raises(ValueError) as exc:
        fn("gpt2")
    for name in DEBUG_ARCHS:
        assert name in str(exc.value)
