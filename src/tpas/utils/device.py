"""The one device policy: where a model runs when the caller does not say.

Every command that runs a model takes ``--device`` and passes it here through
:func:`tpas.models.create_model`; ``None`` or ``"auto"`` means this process's GPU when CUDA is
present (``cuda:LOCAL_RANK`` under a multi-process launch, one GPU per process), else the CPU.
"""

from __future__ import annotations

import os

import torch

from tpas.errors import TpasError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to use for ``device`` (None/"auto" = GPU when present, else CPU)."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cuda")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise TpasError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TpasError(f"device {device!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
    return resolved
