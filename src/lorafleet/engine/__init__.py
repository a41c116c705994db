"""The `Fleet` API (no web framework imports)."""

from .fleet import Fleet

__all__ = ["Fleet"]
