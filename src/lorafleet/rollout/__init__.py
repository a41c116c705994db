"""Rollout engines: push adapter snapshots into vLLM / SGLang and sample there (imports engine +
adapters only)."""

from .base import RolloutEngine, RolloutError, RolloutRefused

__all__ = ["ENGINES", "RolloutEngine", "RolloutError", "RolloutRefused", "RolloutUnavailable", "make_engine"]

ENGINES = ("vllm", "vllm-local", "vllm-inprocess", "sglang")
BUILT = ("vllm", "vllm-local", "vllm-inprocess", "sglang")  # engines with a sink in this version
# each engine's own options (besides ``engine``), as make_engine accepts them
OPTIONS = {
    "vllm": ("url", "max_lora_rank", "max_loras", "max_versions", "adapter_dir", "timeout_s"),
    "vllm-local": ("python", "max_lora_rank", "max_loras", "max_versions", "adapter_dir", "timeout_s",
                   "startup_timeout_s", "dtype", "max_model_len", "enforce_eager", "extra_args", "port"),
}


class RolloutUnavailable(ValueError):
    """A rollout engine this version of lorafleet has no sink for (a user's config choice: one line)."""


def make_engine(spec: dict, *, base_dir: str, max_rank: int) -> RolloutEngine:
    """The engine a ``rollout:`` spec names: ``vllm`` (a running server at ``url``) or
    ``vllm-local`` (a server started here on ``base_dir``, with ``--max-lora-rank`` =
    ``max_lora_rank`` or the trainer's ``max_rank``) or ``sglang`` (`sglang.make_sglang_engine`).
    Bad options are ValueErrors naming the option; an engine that cannot be reached or started is
    a RolloutError. Any other name is refused by name — never a silent fall-back to the built-in
    sampler, which would train on a different behaviour policy than the user asked for."""
    name = spec.get("engine")
    if name == "sglang":
        from .sglang import make_sglang_engine

        return make_sglang_engine(spec, base_dir=base_dir, max_rank=max_rank)
    if name == "vllm-inprocess":  # vLLM's LLM in this process: lorafleet and vllm in one environment
        from .vllm_inprocess import make_vllm_inprocess_engine

        return make_vllm_inprocess_engine(spec, base_dir=base_dir, max_rank=max_rank)
    if name not in BUILT:
        raise RolloutUnavailable(
            f"rollout engine {name!r} is not available in this version of lorafleet"
            + (": its sink is not built yet" if name in ENGINES else "")
            + f" (available engines: {', '.join(BUILT)}); remove the rollout: block to sample with the "
            "built-in sampler")
    opts = {k: v for k, v in spec.items() if k != "engine"}
    unknown = sorted(set(opts) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"engine {name} has no option {', '.join(map(repr, unknown))} "
                         f"(its options: {', '.join(OPTIONS[name])})")
    if name == "vllm":
        from .vllm import VLLMEngine

        if not opts.get("url"):
            raise ValueError("engine vllm needs url: the running server's http://host:port")
        return VLLMEngine(opts.pop("url"), **opts)
    from .vllm_local import start_local_engine

    opts.setdefault("max_lora_rank", max_rank)
    return start_local_engine(base_dir, **opts)
