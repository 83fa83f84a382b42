"""Appearance factors of a synthetic pedestrian: what the captions describe and the renderer draws.

Every factor is sampled independently, so a retrieval model must read all of them; each value is a
plain name that both ``render`` (colours, shapes) and ``captions`` (words) look up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Colour names with two RGB shades: the training shade and a shifted test shade (a stand-in for the
# synthetic-to-real gap: the same word, a somewhat different pixel value).
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((200, 34, 40), (168, 42, 58)),
    "blue": ((38, 78, 190), (52, 92, 160)),
    "green": ((40, 150, 60), (70, 128, 70)),
    "yellow": ((236, 204, 40), (214, 190, 78)),
    "white": ((238, 238, 236), (214, 216, 222)),
    "black": ((28, 28, 32), (46, 44, 50)),
    "grey": ((128, 130, 134), (112, 116, 124)),
    "orange": ((240, 124, 28), (212, 118, 50)),
    "purple": ((120, 50, 160), (110, 66, 140)),
    "pink": ((240, 128, 170), (214, 136, 160)),
    "brown": ((120, 74, 40), (104, 72, 52)),
    "navy": ((24, 36, 92), (38, 48, 96)),
    "beige": ((214, 192, 150), (196, 180, 150)),
}

SKIN: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "pale": ((248, 218, 196), (236, 212, 196)),
    "light": ((232, 190, 156), (220, 184, 158)),
    "tan": ((198, 146, 104), (186, 140, 108)),
    "brown": ((150, 98, 62), (140, 98, 70)),
    "dark": ((96, 62, 40), (90, 64, 48)),
}

HAIR_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "black": ((24, 20, 18), (40, 36, 34)),
    "brown": ((96, 58, 30), (100, 68, 44)),
    "blond": ((226, 190, 110), (204, 178, 120)),
    "red": ((170, 66, 30), (150, 72, 46)),
    "grey": ((170, 170, 168), (150, 152, 156)),
}

# factor name -> its values (all but glasses have at least 4 values)
FACTORS: dict[str, tuple[str, ...]] = {
    "build": ("slim", "average", "stocky", "tall"),
    "skin": tuple(SKIN),
    "hair_style": ("short", "long", "ponytail", "bun", "bald"),
    "hair_colour": tuple(HAIR_COLOURS),
    "top": ("t-shirt", "long-sleeved shirt", "jacket", "hoodie", "tank top"),
    "top_colour": ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "purple", "pink"),
    "bottom": ("trousers", "shorts", "skirt", "cropped trousers"),
    "bottom_colour": ("blue", "black", "grey", "beige", "brown", "white", "navy", "green"),
    "shoes": ("white sneakers", "black boots", "brown shoes", "red sneakers", "sandals"),
    "bag": ("none", "backpack", "shoulder bag", "handbag"),
    "bag_colour": ("black", "brown", "red", "blue", "green"),
    "hat": ("none", "cap", "beanie", "sun hat"),
    "hat_colour": ("black", "red", "blue", "white", "beige"),
    "glasses": ("none", "glasses", "sunglasses"),
}

# probabilities are uneven where "none" should be common, like in the street
_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bag": (0.4, 0.25, 0.2, 0.15),
    "hat": (0.55, 0.2, 0.15, 0.1),
    "glasses": (0.65, 0.2, 0.15),
}


@dataclass(frozen=True, slots=True)
class Appearance:
    """One identity's looks; shared by its normal and its anomalous image."""

    build: str
    skin: str
    hair_style: str
    hair_colour: str
    top: str
    top_colour: str
    bottom: str
    bottom_colour: str
    shoes: str
    bag: str
    bag_colour: str
    hat: str
    hat_colour: str
    glasses: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _pick(rng: np.random.Generator, name: str) -> str:
    values = FACTORS[name]
    weights = _WEIGHTS.get(name)
    index = int(rng.choice(len(values), p=weights)) if weights else int(rng.integers(len(values)))
    return values[index]


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draw every factor independently (bottom colour avoids matching the top, for readable captions)."""
    values = {name: _pick(rng, name) for name in FACTORS}
    while values["bottom_colour"] == values["top_colour"]:
        values["bottom_colour"] = _pick(rng, "bottom_colour")
    return Appearance(**values)


def rgb(table: dict, name: str, test_style: bool, rng: np.random.Generator | None = None, jitter: int = 0) -> tuple[int, int, int]:
    """The RGB shade of a named colour for the train or test style, optionally jittered per image."""
    base = table[name][1 if test_style else 0]
    if rng is None or not jitter:
        return base
    d = rng.integers(-jitter, jitter + 1, size=3).tolist()
    return tuple(min(255, max(0, c + e)) for c, e in zip(base, d))


def shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Darker (factor < 1) or lighter (> 1) version of a colour, for outlines and far-side limbs."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)
    return tuple(int(c + (255 - c) * (factor - 1)) for c in colour)
