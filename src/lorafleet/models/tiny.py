"""Tiny random-init causal LMs of any ``model_type``, built in code from transformers' own config
class: the fixtures of ``tests/test_architectures.py`` and ``bench/arch_parity.py``.

`tiny_config` starts from the config class's defaults, sets toy sizes on every field it has of
the usual names (hidden 64, 2 layers, 4 heads / 2 KV, head_dim 16, intermediate 48, vocab 256,
4 experts top-2, expert intermediate 24, no dropout, eager attention and experts), then applies
``TINY_OVERRIDES[model_type]`` (what that family needs on top: layer patterns, MLA ranks, ...).
`build_tiny_model` instantiates ``AutoModelForCausalLM`` under a seed, re-draws routers / packed
experts the model's init left at zero (as `debug.build_debug_model` does) and returns it in eval
mode. The nine `debug` architectures keep their own configs (`lorafleet.models.debug`).

A model type the installed transformers does not have raises `UnavailableArchitecture` (tests
skip it: transformers 5.17 lacks some of the newer ones).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from .debug import COMMON_SIZES, DENSE_INTERMEDIATE, default_dtype, fix_degenerate_moe

__all__ = ["TINY_OVERRIDES", "TINY_ARCHS", "UnavailableArchitecture", "tiny_config", "build_tiny_model"]


class UnavailableArchitecture(ValueError):
    """The installed transformers has no config / causal-LM class for this model type."""


# the debug models' common sizes (attention_dropout is set below, only where a config has it),
# plus what those nine set per architecture
_SIZES: dict[str, Any] = {k: v for k, v in COMMON_SIZES.items() if k != "attention_dropout"} | dict(
    head_dim=16, intermediate_size=DENSE_INTERMEDIATE)
# set only where the config class has the field
_IF_PRESENT: dict[str, Any] = dict(
    # experts
    num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_k=2, moe_topk=2, moe_top_k=2,
    moe_intermediate_size=24, expert_intermediate_size=24,
    shared_expert_intermediate_size=32, shared_intermediate_size=32,
    n_shared_experts=1, moe_num_shared_experts=1,
    output_router_logits=False, router_jitter_noise=0.0, router_aux_loss_coef=0.0,
    # no randomness in train mode (activation checkpointing runs the model in train mode)
    attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    summary_first_dropout=0.0, mlp_dropout=0.0, dropout=0.0, classifier_dropout=0.0,
    residual_dropout=0.0, embedding_dropout=0.0, ffn_dropout=0.0, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # ---------------------------------------------------------------- dense
    "mistral": {}, "ministral": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {}, "phi": {}, "phi3": {},
    "granite": {}, "glm4": {}, "olmo2": {}, "olmo3": {}, "cohere": {}, "cohere2": {}, "starcoder2": {},
    "smollm3": {}, "exaone4": {}, "seed_oss": {}, "apertus": {}, "hunyuan_v1_dense": {}, "ernie4_5": {},
    "helium": {}, "stablelm": {}, "internlm3": {}, "arcee": {},
    "gpt_neox": {},  # layers at gpt_neox.layers, fused query_key_value
    # ---------------------------------------------------------------- MoE
    "granitemoe": {}, "granitemoeshared": {},
    # layer 0 attention + dense MLP, layer 1 Mamba + MoE
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
                  mamba_dt_rank=8, mamba_d_state=8, use_mamba_kernels=False),
    "minimax": dict(layer_types=["linear_attention", "full_attention"], block_size=4),
    "minimax_m2": {},
    "phimoe": {},
    # layer 0 dense, layer 1 MoE
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "flex_olmo": {},
    # linear (gated delta net) + full attention; linear_num_value_heads == experts on purpose:
    # in_proj_a / in_proj_b [4, 64] must not be mistaken for routers
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                             linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
    "glm4_moe": dict(first_k_dense_replace=1, n_group=1, topk_group=1),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_layer_end_index=1, moe_layer_interval=1),
    "hunyuan_v1_moe": {},
    "dots1": dict(first_k_dense_replace=1, n_group=1, topk_group=1, layer_types=["full_attention"] * 2,
                  sliding_window=None),
    # MLA: q_lora_rank None -> q_proj (DeepSeek-V2-Lite); layer 0 dense, layer 1 MoE
    "deepseek_v2": dict(first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                        topk_method="greedy"),
    # ------------------------------------------------- dense LoRA only (experts refused)
    "llama4_text": dict(intermediate_size=24, intermediate_size_mlp=48, num_experts_per_tok=1,
                        interleave_moe_layer_step=1, layer_types=["chunked_attention", "full_attention"],
                        attention_chunk_size=4, no_rope_layers=[1, 0]),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, hidden_size=64)),
}
TINY_ARCHS: tuple[str, ...] = tuple(TINY_OVERRIDES)


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        raise UnavailableArchitecture(
            f"transformers {transformers.__version__} has no model_type {model_type!r}"
        ) from None


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    cls = _config_class(model_type)
    defaults = cls().to_dict()
    kwargs: dict[str, Any] = dict(_SIZES)
    kwargs.update({k: v for k, v in _IF_PRESENT.items() if k in defaults})
    kwargs.update(TINY_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    kwargs.setdefault("attn_implementation", "eager")
    if "experts_implementation" not in kwargs:
        kwargs["experts_implementation"] = "eager"
    try:
        config = cls(**kwargs)
    except TypeError:  # a config class that refuses an implementation kwarg
        kwargs.pop("experts_implementation")
        config = cls(**kwargs)
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = bool(overrides.get("output_router_logits", False))
    return config


def build_tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny float32 ``*ForCausalLM`` of ``model_type`` in eval mode, deterministic for ``seed``
    (the global RNG state is restored afterwards)."""
    config = tiny_config(model_type, **overrides)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnavailableArchitecture(f"transformers {transformers.__version__} has no causal LM for {model_type!r}")
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with default_dtype(torch.float32):
            model = transformers.AutoModelForCausalLM.from_config(config)
        fix_degenerate_moe(model, seed, std=config.initializer_range)
    finally:
        torch.random.set_rng_state(rng_state)
    model.eval()
    return model
