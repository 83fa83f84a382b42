"""Image preprocessing on tensors (no torchvision): load, resize, normalise, light augmentation."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

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


@dataclass(frozen=True)
class CameraAugment:
    """Ranges of the capture-condition augmentation (a camera other than the training one).

    Each effect is drawn per image: exposure (a global gain), white balance (a gain per RGB
    channel), optical blur (Gaussian, sigma in source pixels), sensor noise (Gaussian, std in
    0-255 levels) and JPEG re-compression (quality). The ranges move pixels as much as a
    different street camera would while keeping colour names true: a red top stays red under a
    0.7-1.25 exposure and a +-8% channel tint. ``p`` is the probability of each of blur, noise
    and JPEG (exposure and white balance are always drawn; their ranges include 1).
    """

    exposure: tuple[float, float] = (0.7, 1.25)
    white_balance: float = 0.08
    blur: tuple[float, float] = (0.2, 1.2)
    noise: tuple[float, float] = (1.0, 7.0)
    jpeg: tuple[int, int] = (60, 92)
    p: float = 0.6

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if rng.random() < self.p:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*self.blur)))
        gains = np.array([rng.uniform(*self.exposure)] * 3) * np.array(
            [1.0 + rng.uniform(-self.white_balance, self.white_balance) for _ in range(3)])
        arr = np.asarray(image, dtype=np.float32) * gains.astype(np.float32)
        if rng.random() < self.p:
            noise = np.random.default_rng(rng.getrandbits(63)).standard_normal(arr.shape, dtype=np.float32)
            arr += noise * np.float32(rng.uniform(*self.noise))
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        if rng.random() < self.p:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=rng.randint(*self.jpeg))
            buf.seek(0)
            with Image.open(buf) as im:
                image = im.convert("RGB")
        return image


class TrainTransform(EvalTransform):
    """Eval transform plus horizontal flip, a mild random resized crop, colour jitter and (with
    ``camera``, the default) :class:`CameraAugment`, applied at the source resolution before the
    resize, in a camera's order: optics, exposure, sensor, codec.

    Flipping is safe for person descriptions only when captions have no left/right words; PAB's
    captions rarely do, and the upstream recipe flips too.
    """

    def __init__(self, size, mean, std, flip: float = 0.5, crop_scale: float = 0.9, jitter: float = 0.1,
                 rng: random.Random | None = None, camera: CameraAugment | None | bool = True):
        super().__init__(size, mean, std)
        self.flip, self.crop_scale, self.jitter = flip, crop_scale, jitter
        self.camera = CameraAugment() if camera is True else (camera or None)
        self.rng = rng or random.Random()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = self.rng
        if self.crop_scale < 1.0:
            w, h = image.size
            scale = rng.uniform(self.crop_scale, 1.0)
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((x0, y0, x0 + cw, y0 + ch))
        if self.camera is not None:
            image = self.camera(image, rng)
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
