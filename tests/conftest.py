"""Shared test fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Keep tests deterministic and light on the 2-core machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TPAS_CACHE", tempfile.mkdtemp(prefix="tpas-test-cache-"))  # exported ONNX graphs
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def xvlm_fixture_dir() -> Path:
    """Upstream X-VLM reference data (see tests/fixtures/xvlm/README.md)."""
    return FIXTURES / "xvlm"
