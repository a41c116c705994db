"""Block-size autotuning of the segment kernels on a real GPU (never in the interpreter).

Each launch site has a heuristic block shape (used in the interpreter, and when
``LORAFLEET_AUTOTUNE=0``) and a short list of candidate configurations that Triton's autotuner
times once per distinct key (the launch's shape arguments, flags and dtypes) and caches for the
process. The row tile ``BM`` of ``segment_mm`` is fixed by the plan, so only the column/inner
blocks, warps and pipeline depth are tuned there. Candidates wider than the problem are clamped
to it and de-duplicated (``prune_*``), so a rank-16 shrink does not time 128-wide column blocks.
Autotuning restores the output between candidates, so in-place (accumulating) launches stay
correct while being timed.
"""

from __future__ import annotations

import os

import triton

ENV = "LORAFLEET_AUTOTUNE"

# (BN, BK, num_warps, num_stages)
SEGMENT_MM_CANDIDATES = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 4),
                         (256, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 3)]
SEGMENT_MM_KEY = ["K", "NOUT", "KB", "G_COL", "K_IS_RANK", "N_IS_RANK", "USE_SCALE", "ACCUMULATE", "BASE",
                  "HAS_BIAS", "BM"]
# (BI, BJ, BM, num_warps, num_stages)
GROUP_OUTER_CANDIDATES = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
                          (32, 128, 64, 4, 3), (128, 32, 64, 4, 3), (16, 128, 64, 4, 4), (128, 16, 64, 4, 4)]
GROUP_OUTER_KEY = ["I", "J", "USE_SCALE"]


def enabled(interpret: bool) -> bool:
    """Autotune unless interpreting or ``LORAFLEET_AUTOTUNE=0``."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("", "0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{ENV}={value!r}: expected 0 or 1")
    return not interpret and value not in ("0", "false", "off", "no")


def _cap(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _configs(candidates, names) -> list:
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in candidates]


def _clamp(configs, caps: dict) -> list:
    seen = {}
    for c in configs:
        kw = {k: min(v, caps[k]) if k in caps else v for k, v in c.kwargs.items()}
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        seen.setdefault(key, triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(seen.values())


def prune_segment_mm(configs, named_args, **kwargs):
    """Clamp BN to the output width and BK to the widest inner dimension (LoRA or base)."""
    return _clamp(configs, {"BN": _cap(named_args["NOUT"]), "BK": _cap(max(named_args["K"], named_args["KB"]))})


def prune_group_outer(configs, named_args, **kwargs):
    return _clamp(configs, {"BI": _cap(named_args["I"]), "BJ": _cap(named_args["J"])})


_tuned: dict = {}


def tuned(name: str, kernel):
    """The autotuned wrapper of ``kernel`` (built on first use, so the interpreter never builds one)."""
    if name not in _tuned:
        if name == "segment_mm":
            configs, key, prune = _configs(SEGMENT_MM_CANDIDATES, ("BN", "BK")), SEGMENT_MM_KEY, prune_segment_mm
            restore = ["Y"]  # accumulating launches read Y: each candidate must start from the same Y
        else:
            configs, key, prune = _configs(GROUP_OUTER_CANDIDATES, ("BI", "BJ", "BM")), GROUP_OUTER_KEY, prune_group_outer
            restore = None  # every launch overwrites the groups it touches
        _tuned[name] = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                                       restore_value=restore)(kernel)
    return _tuned[name]
