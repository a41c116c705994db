"""The tinker SDK's ``LoraConfig.train_unembed`` (default True): LoRA on the LM head.

Where this server can train and serve it, an adapter created with ``train_unembed`` also targets
the LM head (the fleet's vocab target, PEFT's ``lm_head`` on most models; tied embeddings are
fine: the head's delta is its own). Where it cannot, the head is not adapted and everything the
server reports says so (``train_unembed: false``): the SDK sends True by default, so refusing
would break every ordinary client, and pretending would be a lie. The two places:

* a distributed fleet (`lorafleet.distributed`) refuses vocab LoRA;
* ``--rollout-engine sglang``: SGLang refuses LoRA on the LM head, so a sampler pushed to it
  could not be served.
"""

from __future__ import annotations

import json

from ..config import AdapterConfig
from .store import Invalid

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "c_proj",
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}  # what lora_config.train_attn targets


def head_target(model, fleet, rollout_engine: str | None) -> tuple[str | None, str]:
    """The LM head's target name (in ``fleet.vocab_names``; None where the fleet has none) and
    "" when ``train_unembed`` adapts it here, else why this server does not."""
    head = model.get_output_embeddings()
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if head is not None and m is head]
    name = names[0] if names and names[0] in fleet.vocab_names else None
    if name is None:
        return None, f"lorafleet has no LoRA for this model's LM head (vocab targets: {fleet.vocab_names})"
    if getattr(fleet, "comm", None) is not None:
        return name, "a distributed server does not support LoRA on the LM head"
    if rollout_engine == "sglang":
        return name, "the sglang rollout engine cannot load LoRA on the LM head"
    return name, ""


def head_bank_bytes(model, max_adapters: int, max_rank: int) -> int:
    """Memory of the LM head's LoRA bank once allocated, with what training adds: the factors
    (``max_adapters × max_rank × (vocab + hidden)`` in the head's dtype), their gradients (same
    size) and AdamW's two fp32 moments (every slot training at once)."""
    w = model.get_output_embeddings().weight
    values = max_adapters * max_rank * (w.shape[0] + w.shape[1])
    return values * (2 * w.element_size() + 2 * 4)


def reported_lora(lora: dict, adapter: AdapterConfig | dict, head: str | None) -> dict:
    """The client's ``lora_config`` with ``train_unembed`` set to what ``adapter`` really trains
    (what get_info, checkpoints and weights_info echo back)."""
    tm = adapter.target_modules if isinstance(adapter, AdapterConfig) else adapter.get("target_modules", ())
    out = dict(lora)
    out["train_unembed"] = bool(head) and not isinstance(tm, str) and head in tm
    return out


def weights_info(service, tenant: str, body: dict) -> dict:
    """The SDK's ``RestClient.get_weights_info_by_tinker_path``: what a checkpoint trains, read
    from its own adapter config (state.json, or a sampler checkpoint's adapter_config.json)."""
    path = body.get("tinker_path")
    if not isinstance(path, str):
        raise Invalid(f"weights_info needs tinker_path (a tinker://... checkpoint path), got {path!r}")
    kind, d = service.checkpoints.resolve(tenant, path)
    try:
        if kind == "weights":
            meta = json.loads((d / "state.json").read_text())
            adapter = meta["adapter"]
            base = (meta.get("extra") or {}).get("base_model") or service.base_name
            rank, experts = int(adapter["rank"]), bool(adapter.get("experts"))
        else:
            adapter = json.loads((d / "adapter_config.json").read_text())
            rank, base, experts = int(adapter["r"]), service.base_name, False
        tm = adapter.get("target_modules") or []
    except Exception as e:  # noqa: BLE001
        raise Invalid(f"{path!r} is not a readable checkpoint ({e})") from None
    tm = service.fleet.linear_names if tm == "all-linear" else list(tm)
    decoder = [t for t in tm if t not in service.fleet.vocab_names]
    return {"base_model": base, "is_lora": True, "lora_rank": rank,
            "train_unembed": service.head_name is not None and service.head_name in tm,
            "train_attn": any(t in ATTN for t in decoder),
            "train_mlp": experts or any(t not in ATTN for t in decoder)}
