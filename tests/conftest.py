"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep tests deterministic and light on the 2-core machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``shared/`` sits beside the checkout (``../shared``); CI lays a copy there too."""
    for candidate in (REPO / "shared", REPO.parent / "shared"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared/ not found beside the repository")


@pytest.fixture(scope="session")
def xvlm_fixture_dir() -> Path:
    return shared_dir() / "fixtures" / "xvlm"
