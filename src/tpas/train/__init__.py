"""Fine-tuning: losses (ITC, ITM with hard negatives, MLM), optimisation, the accelerate trainer."""

from tpas.train.loop import Trainer, TrainStep, train

__all__ = ["TrainStep", "Trainer", "train"]
