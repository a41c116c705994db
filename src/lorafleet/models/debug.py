"""Tiny random-init Hugging Face causal LMs, built in code, used as test fixtures.

Nothing is downloaded: each model is built from its ``transformers`` config class with toy sizes
(hidden 64, 4 heads, head_dim 16, vocab 256, 2 layers -- 3 for DeepSeek-V3 so it has two MoE
layers), ``attn_implementation="eager"`` and ``experts_implementation="eager"`` so CPU results are
deterministic, then initialised with the model's own ``_init_weights`` under
``torch.manual_seed(seed)``.  Routers and packed expert tensors that the model's init leaves at zero
(or uninitialised) are re-drawn from a seeded N(0, initializer_range) so tokens spread over
experts; with transformers 5.17 the only tensors this touches are GPT-OSS's expert biases
(``gate_up_proj_bias`` / ``down_proj_bias``, zero-initialised by ``GptOssPreTrainedModel``).
Every router already gets ``normal_(std=0.02)`` from its model's ``_init_weights``; DeepSeek's
``e_score_correction_bias`` buffer stays zero (neutral).

Module table (transformers 5.17; derived by inspecting the built models, see
``describe_debug_model``).  Linear module names are relative to ``model.layers.<i>``; shapes of
``nn.Linear`` are ``[out, in]``.  E = experts, H = hidden 64, I = expert intermediate 24.

======================  ========================================================================
arch                    decoder-layer linears / experts
======================  ========================================================================
llama                   self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj.  No experts.
qwen2                   same as llama (q/k/v have bias, o_proj none).  No experts.
qwen3                   same as llama (+ q_norm/k_norm RMSNorms, not linears).  No experts.
qwen2_moe               self_attn.{q,k,v,o}_proj (q/k/v bias); mlp.shared_expert.{gate,up,down}_proj,
                        mlp.shared_expert_gate [1, H]; router ``mlp.gate`` (Qwen2MoeTopKRouter, weight
                        [E, H] -- a Parameter, not an nn.Linear).
                        experts ``mlp.experts``: gate_up_proj [8, 48, 64], down_proj [8, 64, 24].
deepseek_v3             self_attn.{q_a_proj [24, 64], q_b_proj [96, 24], kv_a_proj_with_mqa [40, 64],
                        kv_b_proj [128, 32], o_proj [64, 64]} (+ q_a_layernorm, kv_a_layernorm).
                        Layer 0 (dense): mlp.{gate,up,down}_proj (intermediate 48).
                        Layers 1-2 (MoE): mlp.shared_experts.{gate,up,down}_proj (intermediate 24);
                        router ``mlp.gate`` (DeepseekV3TopkRouter, weight [E, H], buffer
                        e_score_correction_bias [E]).
                        experts ``mlp.experts``: gate_up_proj [8, 48, 64], down_proj [8, 64, 24].
qwen3_moe               self_attn.{q,k,v,o}_proj (+ q_norm/k_norm); router ``mlp.gate``
                        (Qwen3MoeTopKRouter, weight [E, H]).
                        experts ``mlp.experts``: gate_up_proj [8, 48, 64], down_proj [8, 64, 24].
mixtral                 self_attn.{q,k,v,o}_proj; router ``mlp.gate`` (MixtralTopKRouter, weight
                        [E, H]).  experts ``mlp.experts``: gate_up_proj [8, 48, 64],
                        down_proj [8, 64, 24].
olmoe                   self_attn.{q,k,v,o}_proj (+ q_norm [64] / k_norm [32] over the whole
                        projection); router ``mlp.gate`` (OlmoeTopKRouter, weight [E, H]).
                        experts ``mlp.experts``: gate_up_proj [8, 48, 64], down_proj [8, 64, 24].
gpt_oss                 self_attn.{q,k,v,o}_proj (all with bias) + self_attn.sinks [4]; router
                        ``mlp.router`` (GptOssTopKRouter, weight [E, H], bias [E]).
                        experts ``mlp.experts`` (TRANSPOSED, i.e. ``x @ W``, with biases, gate/up
                        INTERLEAVED along the last dim: gate = [..., ::2], up = [..., 1::2]):
                        gate_up_proj [8, 64, 48], gate_up_proj_bias [8, 48],
                        down_proj [8, 24, 64], down_proj_bias [8, 64].
======================  ========================================================================

Packed-expert layouts: every arch except gpt_oss stores ``gate_up_proj`` as ``[E, 2I, H]`` with
gate = first half and up = second half of dim 1 (``F.linear(x, W[e]).chunk(2, -1)``) and
``down_proj`` as ``[E, H, I]``; gpt_oss stores them transposed (``[E, H, 2I]`` / ``[E, I, H]``),
interleaved, with biases and a clamped ``(up + 1) * gate * sigmoid(1.702 * gate)`` activation.

Every MoE block here calls its experts as ``experts(hidden_states[T, H], top_k_index[T, k],
top_k_weights[T, k])``; the routers all return ``(router_logits, top_k_weights, top_k_index)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers

__all__ = [
    "DEBUG_ARCHS",
    "MOE_ARCHS",
    "debug_config",
    "build_debug_model",
    "describe_debug_model",
    "router_modules",
    "experts_modules",
]

DEBUG_ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "deepseek_v3",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
)
MOE_ARCHS: tuple[str, ...] = ("qwen2_moe", "deepseek_v3", "qwen3_moe", "mixtral", "olmoe", "gpt_oss")

# Sizes shared by every debug model.  vocab must stay >= 256 (byte-level test data).
COMMON_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.02,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
)
DENSE_INTERMEDIATE = 48
_EXPERT_INTERMEDIATE = 24
_NUM_EXPERTS = 8
_TOP_K = 2


def _arch_kwargs(name: str) -> dict[str, Any]:
    """Config kwargs for one arch (on top of ``COMMON_SIZES``)."""
    if name == "llama":
        # real Llama-3.1-8B: hidden 4096, 32 layers, 32 heads / 8 KV, head_dim 128,
        # intermediate 14336, vocab 128256, rope llama3 (theta 500000)
        return dict(intermediate_size=DENSE_INTERMEDIATE, head_dim=16)
    if name == "qwen2":
        # real Qwen2.5-7B: hidden 3584, 28 layers, 28 heads / 4 KV, head_dim 128,
        # intermediate 18944, vocab 152064, q/k/v bias
        return dict(intermediate_size=DENSE_INTERMEDIATE, use_sliding_window=False)
    if name == "qwen3":
        # real Qwen3-8B: hidden 4096, 36 layers, 32 heads / 8 KV, head_dim 128,
        # intermediate 12288, vocab 151936, q/k RMSNorm
        return dict(intermediate_size=DENSE_INTERMEDIATE, head_dim=16, use_sliding_window=False)
    if name == "qwen2_moe":
        # real Qwen1.5-MoE-A2.7B: hidden 2048, 24 layers, 16 heads / 16 KV, 60 experts, top-4,
        # moe_intermediate 1408, shared_expert_intermediate 5632 (sigmoid-gated), vocab 151936
        return dict(
            intermediate_size=DENSE_INTERMEDIATE,  # only used by mlp_only_layers (none here)
            moe_intermediate_size=_EXPERT_INTERMEDIATE,
            shared_expert_intermediate_size=40,
            num_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            use_sliding_window=False,
        )
    if name == "deepseek_v3":
        # real DeepSeek-V3: hidden 7168, 61 layers (first 3 dense), 128 heads, MLA with
        # q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128;
        # 256 routed experts + 1 shared, top-8, n_group 8, topk_group 4, moe_intermediate 2048,
        # dense intermediate 18432, routed_scaling_factor 2.5, vocab 129280
        return dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
            num_key_value_heads=4,  # MLA: every head gets its own K/V from the shared latent
            intermediate_size=DENSE_INTERMEDIATE,
            moe_intermediate_size=_EXPERT_INTERMEDIATE,
            n_shared_experts=1,
            n_routed_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            n_group=4,  # 8 experts / 4 groups = 2 per group (the group score is a top-2 sum)
            topk_group=2,  # 2 groups x 2 experts = 4 candidates >= top_k
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            rope_interleave=True,
            num_mtp_layers=0,  # no multi-token-prediction weights in the debug model
        )
    if name == "qwen3_moe":
        # real Qwen3-30B-A3B: hidden 2048, 48 layers, 32 heads / 4 KV, head_dim 128,
        # 128 experts, top-8, moe_intermediate 768, norm_topk_prob True, vocab 151936
        return dict(
            head_dim=16,
            intermediate_size=DENSE_INTERMEDIATE,  # only used by mlp_only_layers (none here)
            moe_intermediate_size=_EXPERT_INTERMEDIATE,
            num_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            use_sliding_window=False,
        )
    if name == "mixtral":
        # real Mixtral-8x7B: hidden 4096, 32 layers, 32 heads / 8 KV, head_dim 128,
        # 8 experts, top-2, expert intermediate 14336, vocab 32000
        return dict(
            head_dim=16,
            intermediate_size=_EXPERT_INTERMEDIATE,  # Mixtral's intermediate_size IS the expert size
            num_local_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            router_jitter_noise=0.0,  # no training-time noise on the router input
            output_router_logits=False,
            sliding_window=None,
        )
    if name == "olmoe":
        # real OLMoE-1B-7B-0924: hidden 2048, 16 layers, 16 heads / 16 KV, head_dim 128,
        # 64 experts, top-8, expert intermediate 1024, vocab 50304, q/k RMSNorm
        return dict(
            head_dim=16,
            intermediate_size=_EXPERT_INTERMEDIATE,  # OLMoE's intermediate_size IS the expert size
            num_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            norm_topk_prob=False,
            clip_qkv=None,
            output_router_logits=False,
        )
    if name == "gpt_oss":
        # real gpt-oss-20b: hidden 2880, 24 layers (alternating sliding-128 / full), 64 heads / 8 KV,
        # head_dim 64, 32 experts, top-4, expert intermediate 2880, attention sinks,
        # yarn rope (factor 32, original 4096, theta 150000), vocab 201088
        # (gpt-oss-120b: 36 layers, 128 experts)
        return dict(
            head_dim=16,
            intermediate_size=_EXPERT_INTERMEDIATE,  # GPT-OSS's intermediate_size IS the expert size
            num_local_experts=_NUM_EXPERTS,
            num_experts_per_tok=_TOP_K,
            sliding_window=4,  # < test sequence lengths, so the sliding mask really bites
            layer_types=["sliding_attention", "full_attention"],
            attention_bias=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=128,
            ),
            output_router_logits=False,
            rms_norm_eps=1e-5,
        )
    raise ValueError(f"unknown debug arch {name!r}; valid names: {', '.join(DEBUG_ARCHS)}")


_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}


def _check_name(name: str) -> None:
    if name not in DEBUG_ARCHS:
        raise ValueError(f"unknown debug arch {name!r}; valid names: {', '.join(DEBUG_ARCHS)}")


def debug_config(name: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The tiny config for ``name``; ``overrides`` replace any config field.

    ``attn_implementation`` (default ``"eager"``) and ``experts_implementation`` (default
    ``"eager"``; transformers would otherwise pick ``"grouped_mm"``) may be overridden too.
    """
    _check_name(name)
    kwargs: dict[str, Any] = dict(COMMON_SIZES)
    kwargs.update(_arch_kwargs(name))
    kwargs["attn_implementation"] = "eager"
    if name in MOE_ARCHS:
        kwargs["experts_implementation"] = "eager"
    kwargs.update(overrides)
    config_cls = getattr(transformers, _CLASSES[name][0])
    config = config_cls(**kwargs)
    if name in MOE_ARCHS:
        # never return router logits / add the aux loss unless a caller asks for it explicitly
        config.output_router_logits = bool(overrides.get("output_router_logits", False))
    return config


# ---------------------------------------------------------------------------------------------
# Helpers to find routers and packed experts (also handy for tests)
# ---------------------------------------------------------------------------------------------


def router_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{qualified name: router}`` for every MoE router (``mlp.gate`` / ``mlp.router``).

    Every router here returns ``(router_logits, top_k_weights, top_k_index)``.
    """
    out = {}
    for qname, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("Router") or cls.endswith("TopkRouter"):
            out[qname] = module
    return out


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{qualified name: experts}`` for every packed-experts module (``mlp.experts``)."""
    return {
        qname: module
        for qname, module in model.named_modules()
        if type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj")
    }


def _degenerate(t: torch.Tensor) -> bool:
    """All zeros, non-finite, or implausibly large for a freshly initialised tensor."""
    if t.numel() == 0:
        return False
    if not bool(torch.isfinite(t).all()):
        return True
    amax = float(t.abs().max())
    return amax == 0.0 or amax > 1e3


@torch.no_grad()
def fix_degenerate_moe(model: torch.nn.Module, seed: int, std: float) -> None:
    """Re-draw routers / packed experts the model's own init left at zero or uninitialised."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    for _, router in sorted(router_modules(model).items()):
        for pname, p in sorted(router.named_parameters(recurse=False)):
            if _degenerate(p):
                # routers: enough spread that top-k varies from token to token
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    for _, experts in sorted(experts_modules(model).items()):
        for pname, p in sorted(experts.named_parameters(recurse=False)):
            if _degenerate(p):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    # anything else that ended up non-finite (an untouched torch.empty) is a transformers bug
    for pname, p in model.named_parameters():
        if p.numel() and not bool(torch.isfinite(p).all()):
            warnings.warn(f"debug model: {pname} was left uninitialised by _init_weights; re-drawn")
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_debug_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> transformers.PreTrainedModel:
    """Build the tiny random-init ``*ForCausalLM`` for ``name`` in eval mode.

    Deterministic for a given ``seed``: weights are initialised in float32 with the model's own
    ``_init_weights`` after ``torch.manual_seed(seed)`` and then cast to ``dtype``, so the weights
    of a bf16 build are the rounded fp32 ones.  As ``from_pretrained`` does, tensors matching
    ``_keep_in_fp32_modules_strict`` (DeepSeek's ``e_score_correction_bias``) stay float32 for
    fp16/bf16 and those matching ``_keep_in_fp32_modules`` (GPT-OSS's norms) for fp16.
    ``overrides`` go to :func:`debug_config`.  The global RNG state is restored afterwards.
    """
    _check_name(name)
    config = debug_config(name, **overrides)
    model_cls = getattr(transformers, _CLASSES[name][1])
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with default_dtype(torch.float32):
            model = model_cls(config)
        fix_degenerate_moe(model, seed, std=config.initializer_range)
    finally:
        torch.random.set_rng_state(rng_state)
    if dtype != torch.float32:
        model = model.to(dtype)
        # mirror from_pretrained: *_strict stays fp32 for fp16 and bf16, the plain list for fp16 only
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        if keep:
            with torch.no_grad():
                for tname, t in list(model.named_parameters()) + list(model.named_buffers()):
                    if any(k in tname for k in keep):
                        t.data = t.data.float()
    model.config.dtype = dtype
    model.eval()
    return model


class default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.prev)


def describe_debug_model(model: torch.nn.Module) -> dict[str, Any]:
    """Linear-module names (relative to ``model.layers.<i>``, all layers merged), the experts path
    and its parameter shapes -- what the module docstring table was generated from."""
    linears: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[str, tuple[int, ...]]] = {}
    routers: dict[str, str] = {}
    for qname, module in model.named_modules():
        parts = qname.split(".")
        if "layers" not in parts:
            continue
        i = parts.index("layers")
        rel = ".".join(parts[i + 2 :])
        if isinstance(module, torch.nn.Linear):
            linears.setdefault(rel, tuple(module.weight.shape))
    for qname, module in experts_modules(model).items():
        rel = qname.split(".layers.", 1)[1].split(".", 1)[1]
        experts.setdefault(
            rel, {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        )
    for qname, module in router_modules(model).items():
        rel = qname.split(".layers.", 1)[1].split(".", 1)[1]
        routers.setdefault(rel, type(module).__name__)
    return {"linears": linears, "experts": experts, "routers": routers}
