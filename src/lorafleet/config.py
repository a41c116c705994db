"""User-facing adapter configuration."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

EXPERT_SHARING_MODES = ("none", "shared_a", "shared_outer")


@dataclass(frozen=True)
class AdapterConfig:
    """How one adapter is shaped.

    rank / alpha: LoRA rank and scale numerator; the update is ``scale * B @ A`` with
        ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``).
    target_modules: ``"all-linear"`` (every linear of the decoder layers except routers and the
        LM head) or a list of short module names (``["q_proj", "v_proj"]``) as in PEFT.
    experts: also put LoRA on the packed MoE expert weights (``gate_up_proj`` and ``down_proj``).
    expert_sharing: ``"none"`` (per-expert A and B), ``"shared_a"`` (one A per projection shared
        by all experts of a layer, per-expert B), ``"shared_outer"`` (``gate_up`` A and ``down`` B
        shared, the inner factors per expert: the SGLang / Megatron-Bridge contract).
    seed: seeds A's Kaiming-uniform init; B always starts at zero. It also seeds the adapter's
        dropout masks.
    lora_dropout: PEFT's ``lora_dropout``: dropout with probability p on the input of the dense
        LoRA (``B @ A @ dropout(x)``), only while the model is in train mode (``model.train()``),
        with masks drawn from the adapter's seed and forward count (reproducible, independent of
        the other adapters in a batch). Expert LoRA has none (as in PEFT).
    layers_to_transform: PEFT's ``layers_to_transform``: decoder layer indices the adapter's
        LoRA (dense and experts) is restricted to; None: every layer.
    rank_pattern / alpha_pattern: PEFT's per-module rank and alpha, ``{pattern: value}`` where a
        pattern matches the end of a module key (a regex; PEFT's ``get_pattern_key``, first match
        wins). Keys: a dense module's path (``model.layers.0.self_attn.q_proj``), an embedding's
        path, an experts module's path plus ``.gate_up_proj`` / ``.down_proj``. Module m uses rank
        ``r_m`` (the slot holds ``slot_rank``, the largest; the rest is zero padding that stays
        zero) and scale ``alpha_m / r_m`` (rsLoRA: ``/ sqrt(r_m)``), exact in training too.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: str | tuple[str, ...] = "all-linear"
    experts: bool = True
    expert_sharing: str = "none"
    use_rslora: bool = False
    seed: int = 0
    lora_dropout: float = 0.0
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] | None = None
    alpha_pattern: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self):
        for field in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, field, _check_pattern(field, getattr(self, field)))
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"AdapterConfig.lora_dropout must be a number in [0, 1), got {p!r}")
        object.__setattr__(self, "lora_dropout", float(p))
        lt = self.layers_to_transform
        if lt is not None:
            if isinstance(lt, int) and not isinstance(lt, bool):
                lt = (lt,)
            if isinstance(lt, (str, bytes)) or not hasattr(lt, "__iter__"):
                raise ValueError(f"AdapterConfig.layers_to_transform must be a list of layer indices, got {lt!r}")
            lt = tuple(lt)
            if not lt or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lt):
                raise ValueError("AdapterConfig.layers_to_transform must be a non-empty list of layer indices "
                                 f"(integers >= 0) or None, got {self.layers_to_transform!r}")
            object.__setattr__(self, "layers_to_transform", tuple(sorted(set(lt))))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"AdapterConfig.alpha must be a finite number, got {self.alpha!r}")
        # the seed feeds torch.Generator.manual_seed: checked here, before a Fleet takes a slot
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"AdapterConfig.seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        for flag in ("experts", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"AdapterConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.expert_sharing not in EXPERT_SHARING_MODES:
            raise ValueError(
                f"AdapterConfig.expert_sharing must be one of {EXPERT_SHARING_MODES}, "
                f"got {self.expert_sharing!r}"
            )
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                raise ValueError(
                    f"AdapterConfig.target_modules must be 'all-linear' or a list of module names, got {tm!r}"
                )
        elif not isinstance(tm, tuple) or not all(isinstance(t, str) and t for t in tm):
            raise ValueError(f"AdapterConfig.target_modules must hold non-empty strings, got {tm!r}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def slot_rank(self) -> int:
        """The rank a slot holds for this adapter: the largest of ``rank`` and ``rank_pattern``."""
        return max([self.rank] + [v for _, v in self.rank_pattern or ()])

    def module_rank(self, key: str) -> int:
        return pattern_value(self.rank_pattern or (), key, self.rank)

    def module_scale(self, key: str) -> float:
        """PEFT's scaling of module ``key``: ``alpha_m / r_m`` (rsLoRA: ``alpha_m / sqrt(r_m)``)."""
        r = self.module_rank(key)
        a = pattern_value(self.alpha_pattern or (), key, self.alpha)
        return a / math.sqrt(r) if self.use_rslora else a / r

    def with_(self, **kw) -> "AdapterConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        tm = self.target_modules
        return {
            "rank": self.rank, "alpha": self.alpha, "target_modules": tm if isinstance(tm, str) else list(tm),
            "experts": self.experts, "expert_sharing": self.expert_sharing, "use_rslora": self.use_rslora,
            "seed": self.seed, "lora_dropout": self.lora_dropout,
            "layers_to_transform": None if self.layers_to_transform is None else list(self.layers_to_transform),
            # only when set, so configs without them keep their earlier dict (stores, checkpoints)
            **({"rank_pattern": dict(self.rank_pattern)} if self.rank_pattern else {}),
            **({"alpha_pattern": dict(self.alpha_pattern)} if self.alpha_pattern else {}),
        }

    @staticmethod
    def from_dict(d: dict) -> "AdapterConfig":
        allowed = {"rank", "alpha", "target_modules", "experts", "expert_sharing", "use_rslora", "seed",
                   "lora_dropout", "layers_to_transform", "rank_pattern", "alpha_pattern"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown adapter field(s) {unknown}; allowed: {sorted(allowed)}")
        return AdapterConfig(**d)


def pattern_value(patterns, key: str, default):
    """PEFT's `get_pattern_key` lookup: the value of the first pattern that matches the end of
    ``key`` (``patterns``: a dict or (pattern, value) pairs)."""
    for k, v in (patterns.items() if isinstance(patterns, dict) else patterns):
        if re.match(rf"(.*\.)?({k})$", key):
            return v
    return default


def _check_pattern(field: str, pat):
    """None / {} -> None; else (pattern, value) pairs in the given order, each checked."""
    if pat is None:
        return None
    items = pat.items() if isinstance(pat, dict) else pat
    try:
        items = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ValueError(f"AdapterConfig.{field} must be a dict of module pattern -> value, got {pat!r}") from None
    for k, v in items:
        if not isinstance(k, str) or not k:
            raise ValueError(f"AdapterConfig.{field}: pattern {k!r} is not a non-empty string")
        try:
            re.compile(k)
        except re.error as exc:
            raise ValueError(f"AdapterConfig.{field}: pattern {k!r} is not a valid regular expression ({exc})") from None
        if field == "rank_pattern":
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AdapterConfig.rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"AdapterConfig.alpha_pattern[{k!r}] must be a finite number, got {v!r}")
    return tuple((k, v if field == "rank_pattern" else float(v)) for k, v in items) or None
