"""CLI subcommands: one module per group, each with ``register(subparsers)``; the work lives in library functions.

Modules import only ``argparse`` at the top, so ``tpas --help`` stays fast; each command imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_bad_image_argument", "add_device_argument", "add_runtime_argument"]


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` for every command that runs a model (see :func:`tpas.utils.device.resolve_device`)."""
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (this process's GPU when there is one, else cpu), cpu, cuda, cuda:N")


def add_bad_image_argument(parser: argparse.ArgumentParser, default: str | None = "error") -> None:
    """``--on-bad-image`` for every command that reads images (see :mod:`tpas.data.images`);
    ``default=None`` leaves the choice to the run config (``tpas train``: ``data.on_bad_image``)."""
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default=default,
                        help="an image that is missing or does not decode: error = stop before the work starts, "
                             "listing every such image (default" + ("" if default else ": data.on_bad_image, error")
                             + "); skip = leave it out and report at the end what was skipped")


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    """``--runtime`` for commands that encode or re-rank (see :mod:`tpas.search.runtime`)."""
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx", "onnx-int8"),
                        help="auto (default) = ONNX Runtime on a CPU (same numbers, several times faster), "
                             "torch on a GPU; onnx-int8 = int8 weights (faster with AVX-512 VNNI, lossy)")
