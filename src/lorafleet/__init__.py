"""lorafleet: train many LoRA adapters at once on one frozen dense or MoE base model."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names are loaded on first use: `lorafleet train` imports this package before its signal
# handlers are set, and importing torch eagerly here left seconds in which Ctrl-C printed a traceback.
_EXPORTS = {
    "AdapterConfig": ".config",
    "Example": ".types",
    "Fleet": ".engine",
    "ForwardBackwardResult": ".engine",
    "OptimConfig": ".engine",
    "SampleRequest": ".engine",
    "SamplingParams": ".engine",
    "SampledSequence": ".engine",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
