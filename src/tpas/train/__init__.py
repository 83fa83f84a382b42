"""Fine-tuning: losses (ITC, ITM with hard negatives, MLM), optimisation, the accelerate trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep ``import tpas.train`` light; the trainer pulls in accelerate
    from pathlib import Path

    from tpas.config import TrainConfig


def train(config: "TrainConfig", resume: bool = False, trainset=None) -> "Path":
    """Run (or resume) a training run; returns its directory. See :func:`tpas.train.loop.train`."""
    from tpas.train.loop import train as _train

    return _train(config, resume=resume, trainset=trainset)


__all__ = ["train"]
