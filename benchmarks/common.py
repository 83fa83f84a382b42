"""What every benchmark script shares: the path to the package sources and how figures are saved."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from tpas.utils.io import write_json, write_text  # noqa: E402


def save_results(dest: str | os.PathLike, data: Any, markdown: str) -> None:
    """Write a benchmark's figures as ``dest.json`` and ``dest.md`` (atomically) and say where."""
    dest = Path(dest)
    write_json(dest.with_suffix(".json"), data)
    write_text(dest.with_suffix(".md"), markdown)
    print(f"saved {dest.with_suffix('.json')} and {dest.with_suffix('.md')}")
