"""Where lorafleet caches what it builds itself (pretrained debug bases, the offline Qwen
tokenizer), and a lock so that concurrent processes build each entry once.

Entries are written with :func:`lorafleet.utils.atomic.atomic_dir`, so a reader never sees a
half-written one; the lock only saves the second process from building the same entry again (a
pretrained base takes a minute of CPU) and from replacing the first one's directory while it is
being read.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, atomic writes still keep entries whole
    fcntl = None


def cache_root() -> Path:
    """``$LORAFLEET_CACHE``, default ``~/.cache/lorafleet``."""
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


@contextmanager
def cache_entry_lock(entry, on_wait=None):
    """Hold an exclusive lock for building cache entry ``entry`` (a directory path); blocks while
    another process holds it, after calling ``on_wait()`` (say so: the wait may last the whole
    build). The lock is a sibling file ``.<name>.lock``, left in place (removing it would race
    with a process about to lock it). Callers check for the entry again inside."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
