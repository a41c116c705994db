"""Attaching slot banks to Hugging Face models: what to attach to is found from the model's
structure (`structure.discover`); per-architecture tables keep only real exceptions."""

from .attach import Attachment, attach
from .registry import SUPPORTED_MODEL_TYPES, TESTED_MODEL_TYPES, ArchSpec, arch_spec
from .structure import Structure, discover

__all__ = ["Attachment", "attach", "ArchSpec", "arch_spec", "SUPPORTED_MODEL_TYPES", "TESTED_MODEL_TYPES",
           "Structure", "discover"]
