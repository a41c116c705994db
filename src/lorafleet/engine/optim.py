"""Per-adapter AdamW, learning-rate schedules and gradient clipping over slot views.

Each adapter owns its optimizer state (moments sized to its rank-sliced factors, its step count,
its schedule). The update is `torch.optim.AdamW`'s single-tensor algorithm, op for op, applied
in place to the adapter's views of the stacked slot tensors, so one adapter's step never touches
another adapter's slot.

Low-precision (bf16/fp16) factors train in mixed precision: the moments and an fp32 master copy
of every factor live in the adapter's `AdamState`; the step runs on the master and rounds it back
into the bank, so updates below half a bf16 ulp accumulate instead of vanishing. fp16 adds a
per-adapter dynamic loss scale (`LossScaler`), because fp16's range is too small for gradients.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

import torch

from ..utils.values import finite_field, int_field, strict_from_dict

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """AdamW hyperparameters and the LR schedule of one adapter.

    The learning rate of optimizer step ``t`` (0 for the first step) is ``lr * warmup(t) * decay(t)``:
    ``warmup(t) = min(1, (t + 1) / warmup_steps)`` (1 without warmup); after warmup, ``linear`` and
    ``cosine`` decay from ``lr`` to ``lr * min_lr_ratio`` at ``total_steps``; ``constant`` stays.
    ``grad_clip_norm``: clip this adapter's gradients to that global L2 norm (None or 0: off).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field for a setting that would corrupt the adapter: a bool, a
        non-number, nan or inf anywhere. Run at construction and again by `Fleet.set_optimizer`
        (the fields stay assignable)."""
        for name in ("lr", "eps", "weight_decay", "min_lr_ratio"):
            finite_field(self, name)
        for name in ("warmup_steps", "total_steps"):
            int_field(self, name, optional=name == "total_steps")
        if self.grad_clip_norm is not None:
            finite_field(self, "grad_clip_norm", "None or 0 turns clipping off")
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {betas!r}")
        for b in betas:
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= b < 1.0:
                raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(float(b) for b in betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr < 0:
            raise ValueError(f"OptimConfig.lr must be a finite number >= 0, got {self.lr!r}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("OptimConfig.eps must be > 0 and weight_decay >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule != "constant" and not (self.total_steps and self.total_steps > 0):
            raise ValueError(f"OptimConfig.schedule {self.schedule!r} needs total_steps > 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
            raise ValueError(f"OptimConfig.grad_clip_norm must be >= 0, got {self.grad_clip_norm}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int) -> float:
        factor = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        elif self.schedule != "constant":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            if self.schedule == "linear":
                decay = 1.0 - progress
            else:
                decay = 0.5 * (1.0 + math.cos(math.pi * progress))
            factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay
        return self.lr * factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @staticmethod
    def from_dict(d: dict) -> "OptimConfig":
        return strict_from_dict(OptimConfig, d, "optimizer")


@dataclass
class AdamState:
    """One adapter's optimizer state: moments keyed like its factor views."""

    step: int = 0
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    # fp32 master copies of low-precision (bf16/fp16) factors; empty for fp32 weights
    master: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossScaler:
    """Dynamic loss scale of one adapter (fp16 training; see docs/precision.md).

    `forward_backward` multiplies the adapter's loss by ``scale`` before backward and divides its
    gradients by it when moving them into the fp32 accumulator; `optim_step` skips the adapter's
    step if its gradient holds an inf/nan and multiplies ``scale`` by ``backoff_factor``, and
    multiplies it by ``growth_factor`` after ``growth_interval`` clean steps in a row (torch's
    `GradScaler` rule, per adapter). The scale may fall below 1. The initial 2^12 is below
    torch's 2^16 because lorafleet's losses are per-example sums over tokens: a LoRA gradient
    grows with the tokens in the batch, and 2^16 (even 2^15) already overflows fp16 on a toy batch
    of unit-weight cross-entropy, which would skip the first steps.
    """

    scale: float = 2.0**12
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 200
    good_steps: int = 0  # clean steps since the scale last changed
    skipped_steps: int = 0  # total steps skipped for inf/nan gradients

    def __post_init__(self):
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"LossScaler.scale must be a finite number > 0, got {self.scale!r}")
        if not (self.growth_factor >= 1 and 0 < self.backoff_factor < 1):
            raise ValueError("LossScaler needs growth_factor >= 1 and 0 < backoff_factor < 1")
        if self.growth_interval < 1:
            raise ValueError(f"LossScaler.growth_interval must be >= 1, got {self.growth_interval}")

    def update(self, finite: bool) -> None:
        """Account for one optimizer step whose gradient was (not) all finite."""
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "LossScaler":
        return strict_from_dict(LossScaler, d, "loss_scale")


def all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is free of inf/nan (one host sync)."""
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def grad_norm(grads: list[torch.Tensor]) -> float:
    """Global L2 norm, computed as `torch.nn.utils.clip_grad_norm_` does (norm of per-tensor norms)."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float(), 2.0) for g in grads]), 2.0))


def low_precision(dtype: torch.dtype) -> bool:
    """bf16 / fp16: factors that need fp32 masters, fp32 gradient buffers and fp32 AdamW math.
    fp32 and fp64 factors are their own masters (an fp64 fleet keeps fp64 throughout)."""
    return dtype in (torch.bfloat16, torch.float16)


def master_weight(state: AdamState, key: str, param: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor AdamW updates for ``param``: ``param`` itself when it is fp32, else the
    adapter's fp32 master copy. A master that no longer rounds to ``param`` (the weights were
    written from outside: set_adapter_weights, a load) is re-seeded from ``param``."""
    if not low_precision(param.dtype):
        return param
    master = state.master.get(key)
    if master is None or master.shape != param.shape or not torch.equal(master.to(param.dtype), param):
        master = state.master[key] = param.float()
    return master


@torch.no_grad()
def adamw_step(views, grads, state: AdamState, config: OptimConfig, norm: float | None = None) -> dict:
    """One AdamW step of one adapter. ``views``: (key, tensor view) pairs updated in place;
    ``grads``: matching gradient tensors. All math is fp32: low-precision gradients are upcast
    first (norm and clipping included), low-precision weights are stepped through their fp32
    master copy (``state.master``) and then rounded back into the view. ``norm``: the adapter's
    global gradient norm when ``grads`` are only this rank's shards of it (default: theirs)."""
    grads = [g.float() if low_precision(g.dtype) else g for g in grads]
    norm = grad_norm(grads) if norm is None else norm
    clip = config.grad_clip_norm
    if clip:
        coef = min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s clamped coefficient
        if coef < 1.0:
            grads = [g * coef for g in grads]
    lr = config.lr_at(state.step)
    beta1, beta2 = config.betas
    state.step += 1
    bias_correction1 = 1 - beta1**state.step
    bias_correction2_sqrt = math.sqrt(1 - beta2**state.step)
    step_size = lr / bias_correction1
    for (key, param), grad in zip(views, grads):
        work = master_weight(state, key, param)
        if key not in state.exp_avg:
            state.exp_avg[key] = torch.zeros_like(work)
            state.exp_avg_sq[key] = torch.zeros_like(work)
        exp_avg, exp_avg_sq = state.exp_avg[key], state.exp_avg_sq[key]
        if config.weight_decay:
            work.mul_(1 - lr * config.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(config.eps)
        work.addcdiv_(exp_avg, denom, value=-step_size)
        if work is not param:
            param.copy_(work)
    return {"lr": lr, "grad_norm": norm, "step": state.step}
