"""Backgrounds: street, park, plaza, indoor hall, parking lot (plus beach and night street for OOD).

A scene is drawn in pixels on the supersampled canvas: a numpy gradient for sky/walls and ground,
then clutter (buildings, trees, cars, lamps, bins, ...) scaled by a simple ground-plane perspective.
The same background seed gives the same place, so an identity's two images share their setting.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

SCENES = ("street", "park", "plaza", "indoor hall", "parking lot")
OOD_SCENES = ("beach", "night street")

Colour = tuple[int, int, int]


def _col(rng: np.random.Generator, base: Colour, jitter: int = 14) -> Colour:
    d = rng.integers(-jitter, jitter + 1, size=3).tolist()
    return tuple(min(255, max(0, c + e)) for c, e in zip(base, d))


def _dark(c: Colour, f: float = 0.7) -> Colour:
    return tuple(int(v * f) for v in c)


def _gradient(h: int, w: int, stops: list[tuple[float, Colour]]) -> np.ndarray:
    """Vertical colour gradient through (fraction, colour) stops, as one (H, 1, 3) uint8 column."""
    ys = np.linspace(0.0, 1.0, h)
    fr = np.array([s[0] for s in stops])
    cols = np.array([s[1] for s in stops], dtype=np.float32)
    column = np.stack([np.interp(ys, fr, cols[:, c]) for c in range(3)], axis=1)
    return column[:, None, :].astype(np.uint8)


class Stage:
    """Canvas plus the ground-plane perspective: ``size_at(y)`` is one body height in pixels at row y."""

    def __init__(self, w: int, h: int, horizon: float, unit: float, ground: float):
        self.w, self.h, self.horizon, self.unit, self.ground = w, h, horizon, unit, ground
        self.image: Image.Image | None = None
        self.draw: ImageDraw.ImageDraw | None = None

    def size_at(self, y: float) -> float:
        return self.unit * max(y - self.horizon, 1.0) / max(self.ground - self.horizon, 1.0)

    def set_base(self, column: np.ndarray) -> None:
        """Start from a vertical gradient column (H, 1, 3), stretched to the canvas width."""
        self.image = Image.fromarray(np.ascontiguousarray(column)).resize((self.w, self.h), Image.Resampling.NEAREST)
        self.draw = ImageDraw.Draw(self.image)


def _sky(rng, h: int, w: int, horizon: float, night: bool = False) -> list[tuple[float, Colour]]:
    f = horizon / h
    if night:
        return [(0.0, _col(rng, (14, 18, 40), 6)), (f, _col(rng, (50, 50, 80), 8))]
    top = _col(rng, (110, 160, 220), 20) if rng.random() < 0.7 else _col(rng, (180, 186, 196), 10)
    return [(0.0, top), (f, _col(rng, (215, 225, 235), 10))]


def _ground(rng, h: int, horizon: float, near: Colour, far: Colour) -> list[tuple[float, Colour]]:
    return [(horizon / h + 1e-4, far), (1.0, near)]


# ------------------------------------------------------------------ clutter objects (pixel space)

def building_row(st: Stage, rng, lit: float = 0.0) -> None:
    x = -rng.uniform(0, 40)
    while x < st.w:
        bw = rng.uniform(0.35, 0.8) * st.w
        top = rng.uniform(0.0, 0.6) * st.horizon
        col = _col(rng, [(170, 90, 70), (200, 190, 170), (150, 150, 156), (120, 130, 150), (220, 210, 190)][rng.integers(5)])
        if lit:
            col = _dark(col, 0.35)
        st.draw.rectangle((x, top, x + bw, st.horizon + 2), fill=col)
        win = (40, 50, 70) if not lit else (250, 220, 140)
        ww, wh = bw / rng.integers(4, 7), (st.horizon - top) / rng.integers(5, 9)
        yy = top + wh * 0.4
        while yy + wh * 0.6 < st.horizon - 4:
            xx = x + ww * 0.25
            while xx + ww * 0.5 < x + bw:
                fill = win if (not lit or rng.random() < lit) else _dark(col, 0.8)
                st.draw.rectangle((xx, yy, xx + ww * 0.5, yy + wh * 0.55), fill=fill)
                xx += ww
            yy += wh
        x += bw + rng.uniform(-5, 15)


def tree(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y) * rng.uniform(1.3, 2.2)
    trunk = _col(rng, (100, 70, 45))
    st.draw.rectangle((x - s * 0.04, y - s * 0.55, x + s * 0.04, y), fill=trunk)
    green = _col(rng, (60, 120, 55), 20)
    for _ in range(4):
        cx, cy, r = x + rng.uniform(-0.18, 0.18) * s, y - s * rng.uniform(0.6, 0.85), s * rng.uniform(0.15, 0.25)
        st.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_col(rng, green, 12))


def bush(st: Stage, x: float, y: float, rng, scale: float = 1.0) -> None:
    s = st.size_at(y) * scale
    green = _col(rng, (70, 130, 60), 20)
    for _ in range(3):
        cx, r = x + rng.uniform(-0.15, 0.15) * s, s * rng.uniform(0.12, 0.2)
        st.draw.ellipse((cx - r, y - 2 * r, cx + r, y + r * 0.2), fill=_col(rng, green, 12))


def lamp(st: Stage, x: float, y: float, rng, glow: bool = False) -> None:
    s = st.size_at(y)
    pole = (60, 64, 70)
    st.draw.rectangle((x - s * 0.015, y - s * 1.9, x + s * 0.015, y), fill=pole)
    st.draw.rectangle((x - s * 0.06, y - s * 1.95, x + s * 0.06, y - s * 1.88), fill=pole)
    if glow:
        r = s * 0.25
        st.draw.ellipse((x - r, y - s * 1.88 - r * 0.3, x + r, y - s * 1.88 + r * 1.4), fill=(120, 110, 80))
    st.draw.ellipse((x - s * 0.04, y - s * 1.9, x + s * 0.04, y - s * 1.84), fill=(250, 240, 200))


def car(st: Stage, x: float, y: float, rng, scale: float = 1.0) -> None:
    s = st.size_at(y) * scale
    col = _col(rng, [(180, 30, 30), (30, 60, 140), (220, 220, 220), (40, 40, 44), (150, 150, 150), (200, 170, 40)][rng.integers(6)])
    L, H = s * 2.3, s * 0.45
    st.draw.rounded_rectangle((x - L / 2, y - H - s * 0.08, x + L / 2, y - s * 0.08), radius=s * 0.08, fill=col)
    st.draw.polygon([(x - L * 0.3, y - H - s * 0.08), (x - L * 0.18, y - H - s * 0.42), (x + L * 0.22, y - H - s * 0.42),
                     (x + L * 0.36, y - H - s * 0.08)], fill=col)
    st.draw.polygon([(x - L * 0.24, y - H - s * 0.1), (x - L * 0.15, y - H - s * 0.36), (x + L * 0.2, y - H - s * 0.36),
                     (x + L * 0.3, y - H - s * 0.1)], fill=(90, 120, 150))
    for wx in (x - L * 0.3, x + L * 0.3):
        r = s * 0.13
        st.draw.ellipse((wx - r, y - s * 0.08 - r, wx + r, y - s * 0.08 + r), fill=(25, 25, 25))


def bin_(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y)
    col = _col(rng, [(40, 90, 50), (60, 60, 66), (150, 110, 40)][rng.integers(3)])
    st.draw.rectangle((x - s * 0.09, y - s * 0.32, x + s * 0.09, y), fill=col)
    st.draw.rectangle((x - s * 0.1, y - s * 0.35, x + s * 0.1, y - s * 0.3), fill=_dark(col))


def sign(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y)
    st.draw.rectangle((x - s * 0.012, y - s * 1.2, x + s * 0.012, y), fill=(110, 110, 115))
    col = [(30, 90, 180), (200, 40, 40), (240, 200, 40)][rng.integers(3)]
    st.draw.rectangle((x - s * 0.12, y - s * 1.35, x + s * 0.12, y - s * 1.1), fill=col)


def cone(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y)
    st.draw.polygon([(x - s * 0.07, y), (x, y - s * 0.28), (x + s * 0.07, y)], fill=(240, 110, 20))
    st.draw.rectangle((x - s * 0.045, y - s * 0.15, x + s * 0.045, y - s * 0.11), fill=(245, 245, 245))


def planter(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y)
    st.draw.rectangle((x - s * 0.2, y - s * 0.22, x + s * 0.2, y), fill=_col(rng, (150, 140, 130)))
    bush(st, x, y - s * 0.22, rng, 1.0)


def pillar(st: Stage, x: float, y: float, rng) -> None:
    s = st.size_at(y)
    col = _col(rng, (210, 205, 195), 8)
    st.draw.rectangle((x - s * 0.12, 0, x + s * 0.12, y), fill=col)
    st.draw.rectangle((x + s * 0.05, 0, x + s * 0.12, y), fill=_dark(col, 0.85))


def _scatter(st: Stage, rng, makers: list[Callable], n: int, near: float = 0.55) -> None:
    """Put ``n`` objects on the ground, far ones first so nearer ones overlap them."""
    ys = sorted(st.horizon + (st.h - st.horizon) * rng.uniform(0.04, near, size=n) ** 1.5)
    for y in ys:
        makers[int(rng.integers(len(makers)))](st, float(rng.uniform(-0.1, 1.1) * st.w), float(y), rng)


# ------------------------------------------------------------------ scenes

def _street(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    walk = _col(rng, (168, 164, 158))
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz)),
                                _gradient(h - int(hz), w, [(0, _dark(walk, 0.8)), (1, walk)])], axis=0))
    building_row(st, rng)
    road = hz + (h - hz) * 0.12
    st.draw.rectangle((0, hz, w, road), fill=_col(rng, (70, 70, 74), 6))
    for x in np.arange(rng.uniform(0, 30), w, 40):
        st.draw.rectangle((x, (hz + road) / 2 - 1, x + 18, (hz + road) / 2 + 1), fill=(230, 230, 220))
    if rng.random() < 0.6:
        car(st, float(rng.uniform(0, w)), float(road - 2), rng, 0.9)
    st.draw.rectangle((0, road, w, road + 3), fill=(200, 200, 196))
    for y in np.geomspace(8, h - hz, 7):  # paving joints
        st.draw.line((0, hz + y, w, hz + y), fill=_dark(walk, 0.85), width=1)
    _scatter(st, rng, [lamp, bin_, sign, lambda s, x, y, r: tree(s, x, y, r)], int(rng.integers(2, 5)), near=0.35)


def _park(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    grass = _col(rng, (96, 160, 70), 16)
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz)),
                                _gradient(h - int(hz), w, [(0, _dark(grass, 0.8)), (1, grass)])], axis=0))
    for x in np.arange(-10, w + 10, 14):  # tree line
        r = rng.uniform(10, 22)
        st.draw.ellipse((x - r, hz - r * 1.4, x + r, hz + 2), fill=_col(rng, (50, 100, 50), 15))
    cx = rng.uniform(0.2, 0.8) * w
    st.draw.polygon([(cx - 6, hz), (cx + 6, hz), (cx + w * 0.9, h), (cx - w * 0.9, h)], fill=_col(rng, (196, 176, 140)))
    for _ in range(30):
        x, y = rng.uniform(0, w), rng.uniform(hz, h)
        st.draw.line((x, y, x + rng.uniform(-2, 2), y - 4), fill=_dark(grass, 0.8), width=1)
    _scatter(st, rng, [tree, tree, bush, lamp, bin_], int(rng.integers(2, 5)), near=0.35)


def _plaza(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    tile = _col(rng, (205, 195, 175), 12)
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz)),
                                _gradient(h - int(hz), w, [(0, _dark(tile, 0.85)), (1, tile)])], axis=0))
    building_row(st, rng)
    vx = rng.uniform(0.2, 0.8) * w
    for k in range(-8, 9):  # tiles converge to a vanishing point
        st.draw.line((vx + k * 6, hz, vx + k * 70, h), fill=_dark(tile, 0.85), width=1)
    for y in np.geomspace(6, h - hz, 9):
        st.draw.line((0, hz + y, w, hz + y), fill=_dark(tile, 0.85), width=1)
    if rng.random() < 0.6:  # fountain
        fx, fy = rng.uniform(0.1, 0.9) * w, hz + (h - hz) * 0.08
        s = st.size_at(fy)
        st.draw.ellipse((fx - s * 0.9, fy - s * 0.12, fx + s * 0.9, fy + s * 0.12), fill=(150, 150, 150))
        st.draw.ellipse((fx - s * 0.8, fy - s * 0.08, fx + s * 0.8, fy + s * 0.06), fill=(120, 170, 210))
        st.draw.line((fx, fy, fx, fy - s * 0.7), fill=(200, 225, 245), width=max(1, int(s * 0.05)))
    _scatter(st, rng, [planter, lamp, bin_, sign], int(rng.integers(2, 4)), near=0.3)


def _hall(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    wall = _col(rng, [(225, 220, 205), (200, 205, 210), (190, 175, 160)][rng.integers(3)], 10)
    floor = _col(rng, [(170, 160, 150), (200, 200, 205), (140, 110, 80)][rng.integers(3)], 10)
    st.set_base(np.concatenate([_gradient(int(hz), w, [(0, _dark(wall, 0.8)), (1, wall)]),
                                _gradient(h - int(hz), w, [(0, _dark(floor, 0.8)), (1, floor)])], axis=0))
    ceil = hz * 0.18
    st.draw.rectangle((0, 0, w, ceil), fill=_dark(wall, 0.7))
    for x in np.arange(rng.uniform(0, 30), w, 50):
        st.draw.rectangle((x, ceil * 0.4, x + 26, ceil * 0.75), fill=(255, 252, 235))
    for x in np.arange(rng.uniform(-20, 20), w, rng.uniform(60, 90)):
        kind = rng.random()
        if kind < 0.5:  # window
            st.draw.rectangle((x, hz * 0.3, x + 40, hz * 0.8), fill=(170, 200, 225))
            st.draw.line((x + 20, hz * 0.3, x + 20, hz * 0.8), fill=_dark(wall), width=2)
        else:  # door
            st.draw.rectangle((x, hz * 0.45, x + 30, hz), fill=_col(rng, (120, 90, 60)))
    st.draw.rectangle((0, hz - 3, w, hz), fill=_dark(wall, 0.6))
    for y in np.geomspace(8, h - hz, 6):
        st.draw.line((0, hz + y, w, hz + y), fill=_dark(floor, 0.9), width=1)
    _scatter(st, rng, [pillar, planter, bin_, sign], int(rng.integers(1, 4)), near=0.3)


def _parking(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    asphalt = _col(rng, (96, 96, 100), 10)
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz)),
                                _gradient(h - int(hz), w, [(0, _dark(asphalt, 0.85)), (1, asphalt)])], axis=0))
    for x in np.arange(-10, w + 10, 18):
        r = rng.uniform(8, 16)
        st.draw.ellipse((x - r, hz - r * 1.5, x + r, hz + 2), fill=_col(rng, (60, 100, 60), 15))
    row = hz + (h - hz) * rng.uniform(0.05, 0.12)
    for x in np.arange(rng.uniform(-40, 0), w + 40, 28):
        st.draw.line((x, row + 4, x - 20, row + 30), fill=(235, 235, 230), width=2)
    for x in np.arange(rng.uniform(-30, 10), w + 30, rng.uniform(55, 75)):
        if rng.random() < 0.8:
            car(st, float(x), float(row + 8), rng)
    _scatter(st, rng, [lamp, cone, cone], int(rng.integers(1, 4)), near=0.3)


def _beach(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    sand = _col(rng, (226, 206, 160), 10)
    sea = hz + (h - hz) * 0.1
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz)),
                                _gradient(h - int(hz), w, [(0, _dark(sand, 0.9)), (1, sand)])], axis=0))
    st.draw.rectangle((0, hz, w, sea), fill=_col(rng, (50, 120, 170), 10))
    st.draw.line((0, sea, w, sea), fill=(240, 245, 250), width=2)
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.uniform(0, w), sea + rng.uniform(5, 30)
        s = st.size_at(y)
        st.draw.line((x, y, x, y - s * 1.2), fill=(120, 120, 120), width=max(1, int(s * 0.02)))
        st.draw.pieslice((x - s * 0.6, y - s * 1.5, x + s * 0.6, y - s * 0.9), 180, 360, fill=_col(rng, (220, 60, 60), 30))


def _night(st: Stage, rng) -> None:
    h, w, hz = st.h, st.w, st.horizon
    ground = _col(rng, (60, 58, 64), 6)
    st.set_base(np.concatenate([_gradient(int(hz), w, _sky(rng, h, w, hz, night=True)),
                                _gradient(h - int(hz), w, [(0, _dark(ground, 0.7)), (1, ground)])], axis=0))
    building_row(st, rng, lit=0.5)
    _scatter(st, rng, [lambda s, x, y, r: lamp(s, x, y, r, glow=True), bin_], int(rng.integers(2, 4)), near=0.3)


_DRAW: dict[str, Callable[[Stage, np.random.Generator], None]] = {
    "street": _street, "park": _park, "plaza": _plaza, "indoor hall": _hall, "parking lot": _parking,
    "beach": _beach, "night street": _night,
}


def draw_scene(scene: str, w: int, h: int, horizon: float, unit: float, ground: float,
               rng: np.random.Generator) -> Stage:
    """Paint a background on a fresh canvas; ``unit`` is a body height in pixels at row ``ground``."""
    st = Stage(w, h, horizon, unit, ground)
    _DRAW[scene](st, rng)
    return st


def occluder(st: Stage, scene: str, x: float, rng: np.random.Generator) -> None:
    """A near object that hides part of the person (a car, bush, bin, pillar or railing)."""
    y = st.h * rng.uniform(1.0, 1.08)
    if scene in ("street", "parking lot", "night street"):
        car(st, x + st.w * rng.choice([-0.55, 0.55]), y, rng, 0.55)
    elif scene in ("park", "beach"):
        bush(st, x + st.w * rng.uniform(-0.3, 0.3), y, rng, 1.6)
    elif scene == "indoor hall":
        pillar(st, x + st.w * rng.choice([-0.32, 0.32]), y, rng)
    else:
        planter(st, x + st.w * rng.choice([-0.35, 0.35]), y, rng)
