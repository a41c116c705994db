"""Attaching slot banks to Hugging Face models (per-architecture tables are data, not code)."""

from .attach import Attachment, attach
from .registry import SUPPORTED_MODEL_TYPES, ArchSpec, arch_spec

__all__ = ["Attachment", "attach", "ArchSpec", "arch_spec", "SUPPORTED_MODEL_TYPES"]
