"""The training losses, per example, exactly as the Tinker API defines them (sums over tokens).

``lp`` is the learner's logprob of each target token. Each function returns the example's loss
(a scalar) and never looks at another example, so no adapter's loss depends on another's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.values import read_number

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dpo")
DEFAULTS = {
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dpo": {"beta": 0.1},
}
NEEDS = {  # per-token arrays each loss reads from the Example
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cispo": ("logprobs", "advantages"),
    "dpo": ("weights",),
}


def resolve_config(loss_fn: str, loss_fn_config: dict | None) -> dict:
    """The loss's options (defaults filled in), each a float; ValueError for an unknown option,
    a bool or non-number, nan, a clip range with low > high, or a DPO beta that is not finite and
    > 0. A clip threshold may be inf (no bound on that side)."""
    if loss_fn not in LOSSES:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; available: {', '.join(LOSSES)}")
    if loss_fn_config is not None and not isinstance(loss_fn_config, dict):
        raise ValueError(f"loss_fn_config must be a mapping, got {loss_fn_config!r}")
    cfg = dict(DEFAULTS.get(loss_fn, {}))
    for k, v in (loss_fn_config or {}).items():
        if k not in cfg:
            raise ValueError(f"loss_fn {loss_fn!r} takes no option {k!r}; options: {sorted(cfg) or 'none'}")
        cfg[k] = float(read_number(v, float, f"loss_fn_config.{k}", finite=k == "beta"))  # a clip may be inf
    if "clip_low_threshold" in cfg and cfg["clip_low_threshold"] > cfg["clip_high_threshold"]:
        raise ValueError(f"loss_fn {loss_fn!r}: clip_low_threshold {cfg['clip_low_threshold']} is above "
                         f"clip_high_threshold {cfg['clip_high_threshold']}")
    if "beta" in cfg and not cfg["beta"] > 0:
        raise ValueError(f"loss_fn {loss_fn!r}: beta must be a finite number > 0, got {cfg['beta']}")
    return cfg


def cross_entropy(lp, weights):
    """-Σ lp·w (weights may be negative or fractional)."""
    return -(lp * weights).sum()


def importance_sampling(lp, old_lp, adv):
    """-Σ exp(lp - old_lp)·A."""
    return -(torch.exp(lp - old_lp) * adv).sum()


def ppo(lp, old_lp, adv, clip_low_threshold, clip_high_threshold):
    """-Σ min(r·A, clip(r, low, high)·A) with r = exp(lp - old_lp)."""
    ratio = torch.exp(lp - old_lp)
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    return -torch.minimum(ratio * adv, clipped * adv).sum()


def cispo(lp, old_lp, adv, clip_low_threshold, clip_high_threshold):
    """-Σ sg(clip(r, low, high))·lp·A."""
    ratio = torch.exp(lp - old_lp).clamp(clip_low_threshold, clip_high_threshold).detach()
    return -(ratio * lp * adv).sum()


def dpo(lp_chosen, lp_rejected, ref_chosen, ref_rejected, w_chosen, w_rejected, beta):
    """-log σ(β·((Σw·lp_c − Σw·ref_c) − (Σw·lp_r − Σw·ref_r))) for one (chosen, rejected) pair;
    the reference is the base model."""
    margin = ((lp_chosen - ref_chosen) * w_chosen).sum() - ((lp_rejected - ref_rejected) * w_rejected).sum()
    return -F.logsigmoid(beta * margin)


def example_loss(loss_fn: str, cfg: dict, lp, arrays: dict):
    """Loss of one example (not dpo, which works on pairs)."""
    if loss_fn == "cross_entropy":
        return cross_entropy(lp, arrays["weights"])
    if loss_fn == "importance_sampling":
        return importance_sampling(lp, arrays["logprobs"], arrays["advantages"])
    if loss_fn == "ppo":
        return ppo(lp, arrays["logprobs"], arrays["advantages"], **cfg)
    if loss_fn == "cispo":
        return cispo(lp, arrays["logprobs"], arrays["advantages"], **cfg)
    raise AssertionError(loss_fn)
