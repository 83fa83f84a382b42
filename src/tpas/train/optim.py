"""AdamW parameter groups with lr multipliers and no decay on biases/norms, plus lr schedules.

Fine-tuning a pretrained model with new heads wants two things the default optimizer does not
give: the new parts (projections, fusion, ITM head) learn faster than the pretrained towers
(``lr_mult`` globs), and one-dimensional parameters (biases, LayerNorm/BatchNorm scales, the
temperature) are not pulled to zero by weight decay.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights, scalars (temperature) and anything 1-D are exempt from decay."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in ("bias", "temp") or name == "temp"


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """First glob of ``lr_mult`` (in order) matching the parameter name; 1.0 when none does."""
    for pattern, mult in lr_mult.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(mult)
    return 1.0


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Group trainable parameters by (lr multiplier, decay); frozen ones are left out."""
    lr_mult = lr_mult or {}
    groups: dict[tuple[float, bool], dict] = {}
    used_patterns: set[str] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = lr_multiplier(name, lr_mult)
        for pattern in lr_mult:
            if fnmatch.fnmatchcase(name, pattern):
                used_patterns.add(pattern)
                break
        decay = not no_weight_decay(name, param)
        key = (mult, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr * mult, "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    for pattern in lr_mult:
        if pattern not in used_patterns:
            log.warning("lr_mult pattern %r matches no trainable parameter", pattern)
    ordered = [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]
    for g in ordered:
        log.debug("param group lr x%.2f decay=%s: %d tensors", g["lr_mult"], g["weight_decay"] > 0, len(g["params"]))
    return ordered


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01,
                    lr_mult: dict[str, float] | None = None, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, lr_mult)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of ``total_steps``, otherwise a step count."""
    return int(round(warmup * total_steps)) if 0 <= warmup < 1 else int(warmup)


def schedule_fn(kind: str, total_steps: int, warmup: float = 0.0, min_lr_ratio: float = 0.0,
                milestones: list[float] | None = None, gamma: float = 0.1) -> Callable[[int], float]:
    """Factor of the peak lr after ``step`` optimizer steps: linear warmup, then the decay ``kind``.

    cosine: half cosine from 1 to ``min_lr_ratio``; linear: straight line to 0 (X-VLM's schedule);
    step: multiply by ``gamma`` at each milestone (fractions of ``total_steps`` or step counts);
    constant: 1 after warmup.
    """
    total_steps = max(1, int(total_steps))
    n_warm = min(warmup_steps(warmup, total_steps), total_steps)
    marks = sorted(int(round(m * total_steps)) if m < 1 else int(m) for m in (milestones or []))
    if kind not in ("cosine", "linear", "step", "constant"):
        raise ValueError(f"unknown lr schedule {kind!r}: cosine, linear, step or constant")

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, total_steps - n_warm)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "step":
            return gamma ** sum(step >= m for m in marks)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: float = 0.0,
                    min_lr_ratio: float = 0.0, milestones: list[float] | None = None,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`schedule_fn` to every group (multipliers stay in the base lrs)."""
    fn = schedule_fn(kind, total_steps, warmup, min_lr_ratio, milestones, gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
