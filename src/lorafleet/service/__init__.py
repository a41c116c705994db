"""The Tinker-compatible HTTP service (FastAPI + uvicorn) over one `Fleet`.

Needs the ``serve`` extra (``pip install 'lorafleet[serve]'``). See docs/service.md.
"""

from .core import Service, ServiceConfig

__all__ = ["Service", "ServiceConfig"]
