"""Image preprocessing on tensors (no torchvision): load, resize, normalise, light augmentation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tpas.data.images import MISSING
from tpas.errors import DataError


class UnreadableImage(DataError):
    """An image file that is missing or does not decode; the message names it, on one line."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or undecodable file raises :class:`UnreadableImage`."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: {MISSING}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImage(f"{path}: cannot decode: {exc or type(exc).__name__}") from None


def blank_image(size: tuple[int, int], mean) -> Image.Image:
    """A flat image of the normalisation mean colour (all zeros once normalised): what encoding puts
    in place of an image that does not decode under ``--on-bad-image skip``."""
    height, width = size
    return Image.new("RGB", (width, height), tuple(round(255 * m) for m in mean))


def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> float tensor [3,H,W] in [0,1], resized to (H,W) with bicubic (as upstream eval)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


class EvalTransform:
    """Resize to the model's input size, scale to [0,1], normalise."""

    def __init__(self, size: tuple[int, int], mean, std):
        self.size, self.mean, self.std = tuple(size), tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(to_tensor(image, self.size), self.mean, self.std)


class TrainTransform(EvalTransform):
    """Eval transform plus horizontal flip and a mild random resized crop and colour jitter.

    Flipping is safe for person descriptions only when captions have no left/right words; PAB's
    captions rarely do, and the upstream recipe flips too.
    """

    def __init__(self, size, mean, std, flip: float = 0.5, crop_scale: float = 0.9, jitter: float = 0.1,
                 rng: random.Random | None = None):
        super().__init__(size, mean, std)
        self.flip, self.crop_scale, self.jitter = flip, crop_scale, jitter
        self.rng = rng or random.Random()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = self.rng
        if self.crop_scale < 1.0:
            w, h = image.size
            scale = rng.uniform(self.crop_scale, 1.0)
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((x0, y0, x0 + cw, y0 + ch))
        pixels = to_tensor(image, self.size)
        if rng.random() < self.flip:
            pixels = pixels.flip(-1)
        if self.jitter > 0:
            gain = 1.0 + rng.uniform(-self.jitter, self.jitter)
            bias = rng.uniform(-self.jitter, self.jitter) / 2
            pixels = (pixels * gain + bias).clamp_(0.0, 1.0)
        return normalize(pixels, self.mean, self.std)


def resize_tensor(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a [B,3,H,W] batch (for inputs that are already tensors)."""
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
