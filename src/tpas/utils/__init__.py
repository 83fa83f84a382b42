"""Helpers every layer may use: atomic file writes, the device policy."""

from tpas.utils.device import resolve_device
from tpas.utils.io import atomic_open, atomic_path, atomic_save, write_json, write_text

__all__ = ["atomic_open", "atomic_path", "atomic_save", "resolve_device", "write_json", "write_text"]
