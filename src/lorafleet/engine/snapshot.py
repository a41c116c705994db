"""Snapshots: an adapter's tensors at one moment, trimmed to its real rank, in a rollout engine's
layout, for pushing into vLLM / SGLang after an optimizer step (see docs: rollout engines)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

LAYOUTS = ("peft", "vllm", "sglang")


@dataclass(frozen=True)
class Snapshot:
    name: str
    layout: str  # "peft" | "vllm" | "sglang"
    version: int  # optimizer steps applied to this adapter so far
    rank: int  # the real rank (slot padding trimmed)
    tensors: dict[str, torch.Tensor]  # CPU copies, never views of live weights (vLLM scales lora_B in place)
    config: dict  # adapter_config.json contents (PEFT config)
    meta: dict | None = None  # lorafleet.json contents (expert mode, format)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write(self, directory) -> Path:
        """Write the adapter directory atomically: built in a temporary directory beside
        ``directory``, then renamed over it, so an engine never reads half a file."""
        from ..adapters.formats import _write_dir

        path = Path(directory)
        meta = {**(self.meta or {}), "snapshot": {"name": self.name, "version": self.version}}
        _write_dir(path, {k: v.contiguous() for k, v in self.tensors.items()}, self.config, meta)
        return path


class SnapshotMixin:
    """Mixed into `Fleet`: snapshots of adapters and their versions, for rollout engines."""

    def adapter_version(self, name: str) -> int:
        """Optimizer steps applied to the adapter so far (skipped non-finite steps do not count),
        plus the times its weights were replaced by `set_adapter_weights` (also what
        `load_adapter` runs): new weights under an unchanged step count must still read as
        changed, or a rollout engine would keep sampling the old ones."""
        self.slot_of(name)  # unknown name -> ValueError
        return int(self._train[name].adam.step) + self._weight_replacements().get(name, 0)

    def set_adapter_weights(self, name: str, w) -> None:
        # Fleet lists SnapshotMixin before WeightsIOMixin and StateMixin, so these wrap the real ones
        super().set_adapter_weights(name, w)
        self._count_replacement(name)

    def load_state(self, name: str, path, slot: int | None = None) -> dict:
        # a checkpoint's weights under the step count the adapter already had (e.g. a rewind to
        # another run's step-5 state) must read as changed too
        extra = super().load_state(name, path, slot=slot)
        self._count_replacement(name)
        return extra

    def _count_replacement(self, name: str) -> None:
        counts = self._weight_replacements()
        counts[name] = counts.get(name, 0) + 1

    def _weight_replacements(self) -> dict[str, int]:
        return self.__dict__.setdefault("_snapshot_weight_replacements", {})

    def changed_since(self, versions: Mapping[str, int]) -> set[str]:
        """Adapters whose version differs from ``versions[name]``, or that ``versions`` lacks."""
        if not isinstance(versions, Mapping):
            raise ValueError(f"changed_since takes a mapping name -> version, got {type(versions).__name__}")
        return {n for n in self._slots if versions.get(n) != self.adapter_version(n)}

    def snapshot(self, name: str, layout: str = "peft") -> Snapshot:
        """The adapter's tensors now (CPU copies at its real rank), in ``layout``, with its PEFT
        config and version."""
        from ..adapters.formats import adapter_files

        if layout not in LAYOUTS:
            raise ValueError(f"unknown snapshot layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
        version = self.adapter_version(name)
        tensors, config, meta = adapter_files(self.get_adapter_weights(name), layout)
        # adapter_files already copies; clone again only what might still share storage
        tensors = {k: v if v.is_contiguous() and v.device.type == "cpu" else v.cpu().contiguous().clone()
                   for k, v in tensors.items()}
        return Snapshot(name=name, layout=layout, version=version, rank=int(self._configs[name].slot_rank),
                        tensors=tensors, config=config, meta=meta)
