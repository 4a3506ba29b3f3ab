"""The errors every storage backend raises, whatever its driver says."""

from __future__ import annotations


class StoreUnavailableError(Exception):
    """The store cannot take writes or answer reads now (disk full, locked, I/O error, connection lost)."""
