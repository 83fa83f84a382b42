"""Drawing people and props with PIL at a supersampled resolution (anti-aliased after downsampling).

``Painter`` maps figure coordinates (units of body height, y up) to pixels and can draw in *mask*
mode, where every colour becomes 255: the same code then yields silhouettes for the pose tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .appearance import COLOURS, HAIR_COLOURS, SKIN, Appearance, rgb, sample_appearance, shade
from .pose import Body, Figure, Point, Prop, pose_for
from .scenes import draw_scene, occluder

Colour = tuple[int, int, int]
OUTLINE = 0.55  # outlines are the fill colour darkened this much


class Painter:
    """Figure-to-pixel transform plus the few primitives everything is drawn with."""

    def __init__(self, image: Image.Image, scale: float, origin: tuple[float, float], mask: bool = False):
        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.s = scale
        self.ox, self.oy = origin  # pixel position of figure point (0, 0)
        self.mask = mask

    def px(self, p: Point) -> tuple[float, float]:
        return self.ox + p[0] * self.s, self.oy - p[1] * self.s

    def c(self, colour: Colour) -> Colour | int:
        return 255 if self.mask else colour

    def circle(self, p: Point, r: float, fill: Colour, outline: bool = True) -> None:
        x, y = self.px(p)
        rp = r * self.s
        if outline and not self.mask:
            o = rp + max(1.0, 0.012 * self.s)
            self.draw.ellipse((x - o, y - o, x + o, y + o), fill=shade(fill, OUTLINE))
        self.draw.ellipse((x - rp, y - rp, x + rp, y + rp), fill=self.c(fill))

    def capsule(self, a: Point, b: Point, ra: float, rb: float, fill: Colour, outline: bool = True) -> None:
        """A tapered limb segment with round ends."""
        if outline and not self.mask:
            grow = max(1.0, 0.012 * self.s) / self.s
            self._capsule(a, b, ra + grow, rb + grow, shade(fill, OUTLINE))
        self._capsule(a, b, ra, rb, self.c(fill))

    def _capsule(self, a: Point, b: Point, ra: float, rb: float, fill) -> None:
        (ax, ay), (bx, by) = self.px(a), self.px(b)
        ra, rb = ra * self.s, rb * self.s
        dx, dy = bx - ax, by - ay
        n = math.hypot(dx, dy) or 1e-6
        nx, ny = -dy / n, dx / n
        self.draw.polygon([(ax + nx * ra, ay + ny * ra), (bx + nx * rb, by + ny * rb),
                           (bx - nx * rb, by - ny * rb), (ax - nx * ra, ay - ny * ra)], fill=fill)
        self.draw.ellipse((ax - ra, ay - ra, ax + ra, ay + ra), fill=fill)
        self.draw.ellipse((bx - rb, by - rb, bx + rb, by + rb), fill=fill)

    def polygon(self, pts: list[Point], fill: Colour, outline: bool = True) -> None:
        xy = [self.px(p) for p in pts]
        if outline and not self.mask:
            self.draw.polygon(xy, fill=self.c(fill), outline=shade(fill, OUTLINE), width=max(1, round(0.012 * self.s)))
        else:
            self.draw.polygon(xy, fill=self.c(fill))

    def line(self, pts: list[Point], width: float, fill: Colour) -> None:
        self.draw.line([self.px(p) for p in pts], fill=self.c(fill), width=max(1, round(width * self.s)), joint="curve")

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: Colour, outline: bool = True) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, outline)


def _lerp(a: Point, b: Point, t: float) -> Point:
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _unit(a: Point, b: Point) -> Point:
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy) or 1e-6
    return dx / n, dy / n


class Palette:
    """The concrete colours of one person in one image (train or test shade, slight jitter)."""

    def __init__(self, look: Appearance, test_style: bool, rng: np.random.Generator):
        self.skin = rgb(SKIN, look.skin, test_style, rng, 6)
        self.hair = rgb(HAIR_COLOURS, look.hair_colour, test_style, rng, 6)
        self.top = rgb(COLOURS, look.top_colour, test_style, rng, 10)
        self.bottom = rgb(COLOURS, look.bottom_colour, test_style, rng, 10)
        self.bag = rgb(COLOURS, look.bag_colour, test_style, rng, 8)
        self.hat = rgb(COLOURS, look.hat_colour, test_style, rng, 8)
        shoes = {"white sneakers": "white", "black boots": "black", "brown shoes": "brown", "red sneakers": "red",
                 "sandals": "brown"}
        self.shoes = rgb(COLOURS, shoes[look.shoes], test_style, rng, 6)


def draw_person(p: Painter, fig: Figure, look: Appearance, pal: Palette) -> None:
    """Draw one articulated person, far limbs first, in a 3/4 side view."""
    j, b = fig.joints, fig.body
    sign = -1.0 if fig.mirrored else 1.0
    up = _unit(j["pelvis"], j["neck"])
    fwd = (sign * up[1], -sign * up[0])  # the way the chest faces

    far = 0.82
    if look.bag == "backpack":
        _backpack(p, j, b, up, fwd, pal.bag)
    if look.hair_style == "long":
        hb = _lerp(j["head"], j["neck"], 1.0)
        hb = (hb[0] - fwd[0] * b.head_r * 0.6, hb[1] - fwd[1] * b.head_r * 0.6 - b.head_r * 0.6)
        p.capsule((j["head"][0] - fwd[0] * b.head_r * 0.45, j["head"][1] - fwd[1] * b.head_r * 0.45), hb,
                  b.head_r * 0.85, b.head_r * 0.6, pal.hair)
    _arm(p, j, b, "f", look, pal, far)
    _leg(p, j, b, "f", look, pal, far)
    _leg(p, j, b, "n", look, pal, 1.0)
    _hips(p, j, b, look, pal)
    _torso(p, j, b, up, fwd, look, pal)
    _head(p, j, b, fwd, look, pal)
    if look.bag == "shoulder bag":
        _shoulder_bag(p, j, b, up, fwd, pal.bag)
    _arm(p, j, b, "n", look, pal, 1.0)
    if look.bag == "handbag":
        _handbag(p, j, b, pal.bag)


def _arm(p, j, b: Body, tag, look, pal, light) -> None:
    s, e, w = j[f"shoulder_{tag}"], j[f"elbow_{tag}"], j[f"wrist_{tag}"]
    skin, top = shade(pal.skin, light), shade(pal.top, light)
    sleeve = {"t-shirt": 0.5, "tank top": 0.0}.get(look.top, 1.0)
    upper_col = top if sleeve >= 1.0 else skin
    lower_col = top if sleeve >= 1.0 else skin
    r = b.arm_w
    p.capsule(s, e, r * 1.05, r * 0.95, upper_col)
    p.capsule(e, w, r * 0.95, r * 0.8, lower_col)
    if 0 < sleeve < 1.0:
        p.capsule(s, _lerp(s, e, sleeve), r * 1.25, r * 1.15, top)
    p.circle(w, r * 1.05, skin)


def _leg(p, j, b: Body, tag, look, pal, light) -> None:
    h, k, a, t = j[f"hip_{tag}"], j[f"knee_{tag}"], j[f"ankle_{tag}"], j[f"toe_{tag}"]
    skin, cloth, shoe = shade(pal.skin, light), shade(pal.bottom, light), shade(pal.shoes, light)
    r = b.leg_w
    thigh_col = cloth if look.bottom in ("trousers", "cropped trousers") else skin
    shin_col = cloth if look.bottom == "trousers" else skin
    p.capsule(h, k, r * 1.1, r * 0.9, thigh_col)
    p.capsule(k, a, r * 0.9, r * 0.7, shin_col)
    if look.bottom == "shorts":
        p.capsule(h, _lerp(h, k, 0.6), r * 1.25, r * 1.1, cloth)
    elif look.bottom == "cropped trousers":
        p.capsule(k, _lerp(k, a, 0.55), r * 0.95, r * 0.85, cloth)
    if look.shoes == "black boots":
        p.capsule(_lerp(k, a, 0.6), a, r * 0.85, r * 0.8, shoe)
    if look.shoes == "sandals":
        p.capsule(a, t, r * 0.6, r * 0.45, skin)
        p.line([_lerp(a, t, 0.3), _lerp(a, t, 0.75)], r * 0.5, shoe)
    else:
        p.capsule(a, t, r * 0.72, r * 0.55, shoe)
        if look.shoes.endswith("sneakers"):
            p.line([_lerp(a, t, -0.1), t], r * 0.25, (235, 235, 235) if look.shoes.startswith("red") else (90, 90, 90))


def _hips(p, j, b: Body, look, pal) -> None:
    if look.bottom == "skirt":  # one flared shape over both thighs, so it follows sitting and kicking
        pts = []
        for tag in ("f", "n"):
            hip, hem = j[f"hip_{tag}"], _lerp(j[f"hip_{tag}"], j[f"knee_{tag}"], 0.8)
            ux, uy = _unit(hip, hem)
            for r, c in ((b.waist_w, hip), (b.leg_w * 2.0, hem)):
                pts += [(c[0] - uy * r, c[1] + ux * r), (c[0] + uy * r, c[1] - ux * r)]
        p.polygon(_hull(pts), pal.bottom)
    p.circle(j["pelvis"], b.waist_w * 0.95, pal.bottom)


def _hull(pts: list[Point]) -> list[Point]:
    """Convex hull (monotone chain) of a few points."""
    pts = sorted(set(pts))
    if len(pts) < 3:
        return pts

    def half(seq):
        out: list[Point] = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return half(pts) + half(pts[::-1])


def _torso_corners(j, b: Body, up, fwd) -> tuple[Point, Point, Point, Point]:
    side = (up[1], -up[0])  # perpendicular to the spine, independent of facing
    pel, sh = j["pelvis"], _lerp(j["pelvis"], j["neck"], 0.9)
    return ((pel[0] + side[0] * b.waist_w, pel[1] + side[1] * b.waist_w),
            (sh[0] + side[0] * b.chest_w, sh[1] + side[1] * b.chest_w),
            (sh[0] - side[0] * b.chest_w, sh[1] - side[1] * b.chest_w),
            (pel[0] - side[0] * b.waist_w, pel[1] - side[1] * b.waist_w))


def _torso(p, j, b: Body, up, fwd, look, pal) -> None:
    corners = _torso_corners(j, b, up, fwd)
    p.capsule(j["neck"], _lerp(j["neck"], j["head"], 0.4), b.head_r * 0.42, b.head_r * 0.42, pal.skin, outline=False)
    if look.top == "hoodie":  # the hood lies behind the neck
        back = (j["neck"][0] - fwd[0] * b.head_r * 0.7, j["neck"][1] - fwd[1] * b.head_r * 0.7)
        p.circle(back, b.head_r * 0.75, shade(pal.top, 0.85))
    p.polygon(list(corners), pal.top)
    p.circle(_lerp(j["pelvis"], j["neck"], 0.88), b.chest_w * 0.95, pal.top, outline=False)
    front_a = _lerp(corners[0], corners[3], 0.5)
    front_a = (front_a[0] + fwd[0] * b.waist_w * 0.55, front_a[1] + fwd[1] * b.waist_w * 0.55)
    front_b = (j["neck"][0] + fwd[0] * b.chest_w * 0.45, j["neck"][1] + fwd[1] * b.chest_w * 0.45)
    if look.top == "jacket":  # zip and collar
        p.line([front_a, front_b], 0.012, shade(pal.top, 0.5))
        p.capsule(j["neck"], _lerp(j["neck"], front_b, 0.6), b.head_r * 0.5, b.head_r * 0.35, shade(pal.top, 0.75))
    elif look.top == "hoodie":  # pouch pocket
        mid = _lerp(j["pelvis"], j["neck"], 0.3)
        p.line([mid, (mid[0] + fwd[0] * b.waist_w * 0.8, mid[1] + fwd[1] * b.waist_w * 0.8)], 0.01,
               shade(pal.top, 0.6))
    elif look.top == "tank top":
        p.circle(_lerp(j["neck"], j["pelvis"], 0.08), b.head_r * 0.45, pal.skin, outline=False)


def _arc(start: float, stop: float, n: int) -> list[tuple[float, float]]:
    """(sin, cos) of n angles from start to stop degrees (head-local: 0 = up, 90 = face)."""
    return [(math.sin(math.radians(a)), math.cos(math.radians(a)))
            for a in (start + (stop - start) * k / (n - 1) for k in range(n))]


_ARC_HAIR, _ARC_CAP, _ARC_BEANIE, _ARC_SUNHAT = _arc(60, -125, 12), _arc(80, -100, 10), _arc(85, -95, 10), _arc(90, -90, 9)


def _head(p, j, b: Body, fwd, look, pal) -> None:
    h, r = j["head"], b.head_r
    up = _unit(j["neck"], h)
    sign = 1.0 if (fwd[0] * up[1] - fwd[1] * up[0]) > 0 else -1.0
    hfwd = (sign * up[1], -sign * up[0])  # face direction follows the neck

    def at(f: float, u: float) -> Point:
        return h[0] + (hfwd[0] * f + up[0] * u) * r, h[1] + (hfwd[1] * f + up[1] * u) * r

    p.circle(at(0.85, -0.1), r * 0.3, pal.skin)  # nose
    p.circle(h, r, pal.skin)
    style = look.hair_style
    if style != "bald":
        # a cap of hair over the top and back of the head: points on an arc from forehead to nape
        arc = [at(1.12 * sn, 1.12 * cs) for sn, cs in _ARC_HAIR]
        p.polygon(arc + [at(-0.15, 0.1)], pal.hair)
        if style == "ponytail":
            p.capsule(at(-1.0, 0.3), at(-1.6, -0.6), r * 0.32, r * 0.2, pal.hair)
        elif style == "bun":
            p.circle(at(-0.75, 0.85), r * 0.42, pal.hair)
    else:
        p.circle(at(-0.1, 0.0), r * 0.12, shade(pal.skin, 0.85), outline=False)  # ear
    p.circle(at(0.55, 0.15), r * 0.11, (30, 24, 22), outline=False)  # eye
    if look.glasses == "sunglasses":
        p.capsule(at(0.35, 0.18), at(0.95, 0.15), r * 0.18, r * 0.18, (20, 20, 24), outline=False)
    elif look.glasses == "glasses":
        p.line([at(0.3, 0.18), at(0.95, 0.18)], r * 0.1, (40, 40, 40))
        p.line([at(0.3, 0.18), at(-0.3, 0.25)], r * 0.07, (40, 40, 40))
    if look.hat == "cap":
        dome = [at(1.15 * sn, 1.15 * cs) for sn, cs in _ARC_CAP]
        p.polygon(dome, pal.hat)
        p.capsule(at(0.6, 0.55), at(1.65, 0.45), r * 0.14, r * 0.1, shade(pal.hat, 0.8))
    elif look.hat == "beanie":
        dome = [at(1.2 * sn, 1.2 * cs + 0.15) for sn, cs in _ARC_BEANIE]
        p.polygon(dome, pal.hat)
        p.capsule(at(-1.05, 0.25), at(1.05, 0.25), r * 0.2, r * 0.2, shade(pal.hat, 0.8))
    elif look.hat == "sun hat":
        p.capsule(at(-1.9, 0.45), at(1.9, 0.45), r * 0.14, r * 0.14, pal.hat)
        dome = [at(0.95 * sn, 0.95 * cs + 0.45) for sn, cs in _ARC_SUNHAT]
        p.polygon(dome, pal.hat)


def _backpack(p, j, b: Body, up, fwd, colour) -> None:
    c = _lerp(j["pelvis"], j["neck"], 0.6)
    back = (c[0] - fwd[0] * b.chest_w * 1.25, c[1] - fwd[1] * b.chest_w * 1.25)
    p.capsule(_lerp(back, (back[0] + up[0], back[1] + up[1]), 0.09),
              _lerp(back, (back[0] - up[0], back[1] - up[1]), 0.09), b.chest_w * 0.75, b.chest_w * 0.8, colour)


def _shoulder_bag(p, j, b: Body, up, fwd, colour) -> None:
    s = j["shoulder_n"]
    bag = (j["pelvis"][0] - fwd[0] * b.waist_w * 0.9, j["pelvis"][1] - fwd[1] * b.waist_w * 0.9 + 0.01)
    p.line([s, bag], 0.012, shade(colour, 0.7))
    p.capsule((bag[0] - fwd[0] * 0.03, bag[1] - fwd[1] * 0.03), (bag[0] + fwd[0] * 0.03, bag[1] + fwd[1] * 0.03),
              0.04, 0.04, colour)


def _handbag(p, j, b: Body, colour) -> None:
    w, e = j["wrist_n"], j["elbow_n"]
    hang = e if w[1] > j["shoulder_n"][1] else w  # a raised hand keeps the bag on the forearm
    top = (hang[0], hang[1] - 0.02)
    p.line([hang, (top[0] - 0.03, top[1] - 0.02), (top[0] + 0.03, top[1] - 0.02), hang], 0.008, shade(colour, 0.6))
    p.rect(top[0] - 0.045, top[1] - 0.1, top[0] + 0.045, top[1] - 0.025, colour)


# --------------------------------------------------------------------------- props

def draw_prop(p: Painter, prop: Prop, rng: np.random.Generator) -> None:
    q = prop.params
    kind = prop.kind
    if kind == "bench":
        col = (130, 84, 46) if q["wooden"] else (80, 86, 92)
        leg = (60, 60, 64)
        x0, x1 = min(q["x0"], q["x1"]), max(q["x0"], q["x1"])
        for x in (x0 + 0.06, x1 - 0.06):
            p.rect(x - 0.015, 0.0, x + 0.015, q["seat"], leg)
            p.rect(x - 0.012, q["seat"], x + 0.012, q["back"], leg)
        p.rect(x0, q["seat"] - 0.035, x1, q["seat"], col)
        for k in range(2):
            y = q["back"] - 0.02 - k * 0.07
            p.rect(x0, y - 0.035, x1, y, col)
    elif kind == "bicycle":
        frame = q.get("colour", (30, 90, 170))
        r = q["r"]
        for c in (q["rear_pt"], q["front_pt"]):
            p.circle(c, r, (30, 30, 30), outline=False)
            p.circle(c, r * 0.85, (200, 200, 200) if p.mask is False else (0, 0, 0), outline=False)
            p.line([(c[0] - r * 0.85, c[1]), (c[0] + r * 0.85, c[1])], 0.005, (120, 120, 120))
            p.line([(c[0], c[1] - r * 0.85), (c[0], c[1] + r * 0.85)], 0.005, (120, 120, 120))
            p.circle(c, r * 0.08, (60, 60, 60), outline=False)
        bb, seat, bar, rear, front = q["bb_pt"], q["seat_pt"], q["bar_pt"], q["rear_pt"], q["front_pt"]
        stem = _lerp(bar, front, 0.2)
        for a, bpt in ((bb, seat), (bb, rear), (seat, rear), (seat, stem), (bb, stem), (stem, front)):
            p.line([a, bpt], 0.022, frame)
        p.line([bar, stem], 0.02, (40, 40, 40))
        p.capsule((seat[0] - 0.04, seat[1]), (seat[0] + 0.03, seat[1]), 0.018, 0.014, (30, 30, 30))
        p.circle(bb, 0.03, (50, 50, 50))
    elif kind == "box":
        (cx, cy), w, h = q["c_pt"], q["w"], q["h"]
        col = (196, 150, 98)
        p.rect(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, col)
        p.rect(cx - w / 2, cy + h / 2 - 0.025, cx + w / 2, cy + h / 2, shade(col, 0.85), outline=False)
        p.line([(cx - 0.015, cy - h / 2), (cx - 0.015, cy + h / 2)], 0.012, (214, 190, 140))
    elif kind == "phone":
        cx, cy = q["c_pt"]
        p.rect(cx - 0.013, cy - 0.032, cx + 0.013, cy + 0.032, (25, 25, 30))
    elif kind == "ball":
        (cx, cy), r = q["c_pt"], q["r"]
        if q.get("motion"):
            back = -1.0 if not q.get("mirrored") else 1.0
            if q.get("impact"):
                back = -back
            for k, dy in enumerate((-0.6, 0.0, 0.6)):
                p.line([(cx + back * r * 1.3, cy + dy * r), (cx + back * r * (2.4 + 0.4 * k), cy + dy * r)], 0.008,
                       (250, 250, 250))
        p.circle((cx, cy), r, q.get("colour", (240, 240, 240)))
        p.circle((cx + r * 0.2, cy + r * 0.15), r * 0.35, (30, 30, 30), outline=False)
    elif kind == "puddle":
        (cx, cy), w = q["c_pt"], q["w"]
        x, y = p.px((cx, cy))
        a, bb = w * p.s / 2, w * p.s * 0.09
        p.draw.ellipse((x - a, y - bb, x + a, y + bb), fill=p.c((120, 160, 196)))
        p.draw.ellipse((x - a * 0.5, y - bb * 0.5, x + a * 0.2, y + bb * 0.1), fill=p.c((190, 214, 234)))
    elif kind == "wet_sign":
        x, h = q["x"], q["h"]
        p.polygon([(x - 0.07, 0.0), (x - 0.02, h), (x + 0.02, h), (x + 0.07, 0.0)], (246, 206, 20))
        p.rect(x - 0.007, h * 0.4, x + 0.007, h * 0.75, (20, 20, 20), outline=False)
        p.rect(x - 0.007, h * 0.25, x + 0.007, h * 0.32, (20, 20, 20), outline=False)
    elif kind == "fence":
        col = q.get("colour", (70, 100, 80))
        top = q["top"]
        x = q["x"]
        span = 3.0
        if q["chain"]:
            p.rect(x - span, 0.0, x + span, top, (150, 160, 160) if not p.mask else 255, outline=False)
            step = 0.05
            for k in range(int(2 * span / step) + int(top / step) + 2):
                x0 = x - span + k * step
                p.line([(x0, 0.0), (x0 - top, top)], 0.006, (100, 110, 110))
                p.line([(x0 - top, 0.0), (x0, top)], 0.006, (100, 110, 110))
        else:
            for k in range(int(2 * span / 0.07)):
                xx = x - span + k * 0.07
                p.rect(xx - 0.011, 0.0, xx + 0.011, top + 0.02, col, outline=False)
        for y in (top, top * 0.5, 0.04):
            p.rect(x - span, y - 0.016, x + span, y + 0.016, shade(col, 0.8), outline=False)
    elif kind == "ledge":
        x0, x1, top = q["x0"], q["x1"], q["top"]
        wall_left = x1 - x0 > 0 and not q.get("mirrored")
        if wall_left:
            x0 = x1 - 3.0
        else:
            x1 = x0 + 3.0
        col = q.get("colour", (150, 146, 138))
        p.rect(x0, 0.0, x1, top, col)
        p.rect(x0, top - 0.03, x1, top, shade(col, 1.25), outline=False)
        for k in range(1, int(top / 0.08) + 1):
            p.line([(x0, top - k * 0.08), (x1, top - k * 0.08)], 0.004, shade(col, 0.8))


def draw_figure(p: Painter, fig: Figure, look: Appearance, pal: Palette, rng: np.random.Generator,
                other_looks: list[tuple[Appearance, Palette]] | None = None) -> None:
    """Props behind, the person (and any partner), then props in front."""
    for prop in fig.props:
        if not prop.front:
            draw_prop(p, prop, rng)
    for k, other in enumerate(fig.others):
        olook, opal = other_looks[k] if other_looks else (look, pal)
        draw_person(p, other, olook, opal)
    draw_person(p, fig, look, pal)
    for prop in fig.props:
        if prop.front:
            draw_prop(p, prop, rng)


def render_mask(fig: Figure, look: Appearance, size: tuple[int, int], height_frac: float = 0.8) -> np.ndarray:
    """Silhouette (H, W) bool of a figure centred on a blank canvas, scaled by its body height.

    The scale depends on the body only (not the pose), so masks of different actions are comparable.
    """
    h, w = size
    img = Image.new("L", (w * 2, h * 2), 0)
    x0, y0, x1, y1 = fig.bounds()
    scale = min(height_frac * h * 2, 0.95 * w * 2 / max(x1 - x0, 1e-6), 0.95 * h * 2 / max(y1 - y0, 1e-6))
    cx = sum(x for x, _ in fig.joints.values()) / len(fig.joints)  # steadier anchor than the bounds' centre
    p = Painter(img, scale, (w - cx * scale, h * 2 * 0.95), mask=True)
    pal = Palette(look, False, np.random.default_rng(0))
    draw_figure(p, fig, look, pal, np.random.default_rng(0))
    return np.asarray(img.reduce(2)) > 127


# --------------------------------------------------------------------------- whole images

@dataclass(frozen=True, slots=True)
class Style:
    """Camera and photometric style of a split: training look, shifted test look, or far-camera OOD."""

    name: str = "train"
    test_colours: bool = False
    height_frac: tuple[float, float] = (0.7, 0.9)  # body height / image height
    gain: tuple[float, float] = (0.92, 1.08)
    tint: int = 6
    blur: tuple[float, float] = (0.0, 0.0)
    noise: tuple[float, float] = (0.0, 0.0)
    quality: tuple[int, int] = (92, 92)


STYLES = {
    "train": Style(),
    "test": Style("test", True, (0.65, 0.9), (0.7, 1.15), 18, (0.3, 0.9), (2.0, 6.0), (70, 85)),
    "ood": Style("ood", True, (0.35, 0.55), (0.6, 1.1), 22, (0.4, 1.0), (3.0, 7.0), (65, 80)),
}

OCCLUSION_P = 0.12


def render_shot(look: Appearance, action: str, scene: str, size: tuple[int, int], style: Style,
                bg_seed: int, rng: np.random.Generator) -> tuple[Image.Image, int, dict]:
    """One photo: background (from ``bg_seed``), the posed person, occluder, downsampling, style.

    Returns the RGB image, the JPEG quality to save it with, and a few facts about the shot.
    """
    h, w = size
    H, W = 2 * h, 2 * w
    fig = pose_for(action, look.build, rng)
    x0, y0, x1, y1 = fig.bounds()
    s = min(rng.uniform(*style.height_frac) * H, 0.92 * W / (x1 - x0), 0.95 * H / (y1 - y0))
    slack = max(0.0, (0.96 * W - (x1 - x0) * s) / 2)
    cx = W / 2 + rng.uniform(-1, 1) * slack  # pixel x of the bounds' centre
    lo, hi = 0.03 * H + y1 * s, 0.99 * H + y0 * s
    gy = hi if lo >= hi else rng.uniform(max(lo, min(hi, 0.82 * H)), hi)
    bg = np.random.default_rng(bg_seed)
    horizon = min(H * bg.uniform(0.3, 0.5), gy - 0.12 * H)
    stage = draw_scene(scene, W, H, max(horizon, 0.05 * H), s, gy, bg)
    p = Painter(stage.image, s, (cx - (x0 + x1) / 2 * s, gy))
    _shadow(stage.image, p, fig)
    pal = Palette(look, style.test_colours, rng)
    others = [sample_appearance(rng) for _ in fig.others]
    draw_figure(p, fig, look, pal, rng, [(o, Palette(o, style.test_colours, rng)) for o in others])
    occluded = bool(rng.random() < OCCLUSION_P)
    if occluded:
        occluder(stage, scene, cx, rng)
    img = stage.image.reduce(2)
    img = _photometric(img, style, rng)
    quality = int(rng.integers(style.quality[0], style.quality[1] + 1))
    return img, quality, {"mirrored": fig.mirrored, "occluded": occluded, "scale": round(s / H, 3)}


def _shadow(image: Image.Image, p: Painter, fig: Figure) -> None:
    """A soft contact shadow on the ground, fainter when the person is in the air."""
    pts = list(fig.joints.values()) + [q for o in fig.others for q in o.joints.values()]
    xs = [x for x, _ in pts]
    height = min(y for _, y in pts)
    alpha = int(90 * max(0.25, 1.0 - 1.5 * height))
    x, y = p.px(((min(xs) + max(xs)) / 2, 0.0))
    half = ((max(xs) - min(xs)) / 2 + 0.08) * p.s
    ImageDraw.Draw(image, "RGBA").ellipse((x - half, y - 0.03 * p.s, x + half, y + 0.03 * p.s), fill=(0, 0, 0, alpha))


def _photometric(img: Image.Image, style: Style, rng: np.random.Generator) -> Image.Image:
    """Lighting (gain and colour tint), then blur and sensor noise for the shifted styles."""
    if style.blur[1] > 0:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(*style.blur))))
    gain = rng.uniform(*style.gain) + rng.integers(-style.tint, style.tint + 1, size=3) / 255.0
    fixed = np.round(gain * 256).astype(np.uint32)  # integer maths: exact and the same on every machine
    arr = (np.asarray(img).astype(np.uint32) * fixed + 128) >> 8
    if style.noise[1] > 0:
        noise = rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(*style.noise))
        arr = arr.astype(np.int32) + np.round(noise).astype(np.int32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
