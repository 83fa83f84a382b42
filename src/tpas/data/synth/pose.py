"""Joint-angle skeletons: one pose generator per action, plus the props the action needs.

Coordinates are in units of the person's standing height, x pointing the way the person faces and
y pointing up, with the ground at y = 0 once a figure is placed. Angles are in degrees: 0 points
straight down, positive angles turn towards the facing direction (90 = forward, 180 = up).

Limb angles are relative to the torso, so tilting the torso (falling, lying, crawling) carries the
whole body with it. Every generator adds random variation, so no two images of an action match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Body:
    """Segment lengths and widths (units of standing height); ``build`` scales them."""

    head_r: float = 0.062
    neck: float = 0.03
    torso: float = 0.29
    upper_arm: float = 0.16
    forearm: float = 0.15
    thigh: float = 0.235
    shin: float = 0.225
    foot: float = 0.075
    shoulder_off: float = 0.035  # 3/4 view: near and far shoulder are drawn this far apart
    hip_off: float = 0.022
    chest_w: float = 0.085  # half widths of the torso polygon
    waist_w: float = 0.07
    arm_w: float = 0.024
    leg_w: float = 0.036


BUILDS: dict[str, Body] = {
    "slim": Body(chest_w=0.07, waist_w=0.056, arm_w=0.02, leg_w=0.03),
    "average": Body(),
    "stocky": Body(chest_w=0.102, waist_w=0.094, arm_w=0.029, leg_w=0.043, head_r=0.064),
    "tall": Body(torso=0.3, thigh=0.25, shin=0.24, upper_arm=0.168, forearm=0.158, chest_w=0.08, waist_w=0.064),
}


@dataclass(slots=True)
class Angles:
    """Pose parameters. ``torso`` is absolute (180 = upright); limbs are (shoulder/hip, elbow/knee)."""

    torso: float = 180.0
    head: float = 0.0
    arm_n: tuple[float, float] = (5.0, 10.0)
    arm_f: tuple[float, float] = (-5.0, 10.0)
    leg_n: tuple[float, float] = (3.0, 3.0)
    leg_f: tuple[float, float] = (-3.0, 3.0)


@dataclass(slots=True)
class Prop:
    """Something an action needs (bench, bicycle, box, ...); ``points`` bound it for framing."""

    kind: str
    params: dict = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    front: bool = False  # drawn over the person (a box in the hands) instead of behind


@dataclass(slots=True)
class Figure:
    """A posed person (joint positions) with its props, ground at y = 0."""

    joints: dict[str, Point]
    body: Body
    props: list[Prop] = field(default_factory=list)
    others: list["Figure"] = field(default_factory=list)  # a second person (fighting), mirrored
    mirrored: bool = False

    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of everything drawn, with a margin for limb and head thickness."""
        pts = list(self.joints.values())
        for prop in self.props:
            pts.extend(prop.points)
        for other in self.others:
            x0, y0, x1, y1 = other.bounds()
            pts.extend([(x0, y0), (x1, y1)])
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        m = self.body.head_r * 1.3
        return min(xs) - m, min(min(ys) - m, 0.0), max(xs) + m, max(ys) + m


def direction(angle: float) -> Point:
    rad = math.radians(angle)
    return math.sin(rad), -math.cos(rad)


def _add(p: Point, length: float, angle: float) -> Point:
    dx, dy = direction(angle)
    return p[0] + length * dx, p[1] + length * dy


def forward_kinematics(body: Body, a: Angles) -> dict[str, Point]:
    """Joint positions with the pelvis at the origin."""
    pelvis = (0.0, 0.0)
    down = a.torso - 180.0  # the torso's own "down": limb angles are measured from it
    side = (math.cos(math.radians(a.torso - 180.0)), math.sin(math.radians(a.torso - 180.0)))
    neck = _add(pelvis, body.torso, a.torso)
    shoulder = _add(pelvis, body.torso - 0.035, a.torso)
    head = _add(neck, body.neck + body.head_r, a.torso + a.head)
    j: dict[str, Point] = {"pelvis": pelvis, "neck": neck, "head": head}
    for tag, sign in (("n", 1.0), ("f", -1.0)):
        s = (shoulder[0] + sign * body.shoulder_off * side[0], shoulder[1] + sign * body.shoulder_off * side[1])
        h = (sign * body.hip_off * side[0], sign * body.hip_off * side[1])
        arm = a.arm_n if tag == "n" else a.arm_f
        leg = a.leg_n if tag == "n" else a.leg_f
        upper = down + arm[0]
        elbow = _add(s, body.upper_arm, upper)
        wrist = _add(elbow, body.forearm, upper + arm[1])
        thigh = down + leg[0]
        knee = _add(h, body.thigh, thigh)
        shin = thigh - leg[1]
        ankle = _add(knee, body.shin, shin)
        toe = _add(ankle, body.foot, shin + 90.0)
        j.update({f"shoulder_{tag}": s, f"elbow_{tag}": elbow, f"wrist_{tag}": wrist,
                  f"hip_{tag}": h, f"knee_{tag}": knee, f"ankle_{tag}": ankle, f"toe_{tag}": toe})
    return j


def lowest(body: Body, joints: dict[str, Point]) -> float:
    """Lowest drawn point: joints padded by the limb/head thickness."""
    pad = {"head": body.head_r}
    return min(y - pad.get(name, body.leg_w * 0.6) for name, (x, y) in joints.items())


def place(body: Body, angles: Angles, lift: float = 0.0, props: Callable | None = None,
          ground: float | None = None) -> Figure:
    """Run the kinematics and shift everything so the ground is y = 0.

    ``lift`` raises the lowest body point above the ground (mid-air); ``props(joints)`` returns the
    props in pelvis coordinates and may fix the ground itself (a bicycle's wheels touch it).
    """
    joints = forward_kinematics(body, angles)
    made = props(joints) if props else ([], None)
    prop_list, prop_ground = made
    g = prop_ground if prop_ground is not None else (ground if ground is not None else lowest(body, joints) - lift)
    shift = lambda p: (p[0], p[1] - g)  # noqa: E731
    joints = {k: shift(p) for k, p in joints.items()}
    for prop in prop_list:
        prop.points = [shift(p) for p in prop.points]
        prop.params = {k: (shift(v) if isinstance(v, tuple) and len(v) == 2 and k.endswith("_pt") else v)
                       for k, v in prop.params.items()}
        prop.params["ground"] = 0.0
    return Figure(joints=joints, body=body, props=prop_list)


# --------------------------------------------------------------------------- actions

def _n(rng: np.random.Generator, mean: float, sd: float = 6.0) -> float:
    return float(mean + rng.normal(0.0, sd))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _relaxed_arms(rng) -> tuple[tuple[float, float], tuple[float, float]]:
    return (_n(rng, 6, 5), _n(rng, 12, 6)), (_n(rng, -6, 5), _n(rng, 12, 6))


def walking(body, rng):
    p = _u(rng, 0.6, 1.0) * (1 if rng.random() < 0.5 else -1)
    a = Angles(torso=180 - _u(rng, 0, 5), head=_n(rng, 0, 4),
               arm_n=(-22 * p + _n(rng, 0, 4), _n(rng, 18, 5)), arm_f=(22 * p + _n(rng, 0, 4), _n(rng, 18, 5)),
               leg_n=(26 * p + _n(rng, 0, 3), _n(rng, 8, 4) + (12 if p < 0 else 0)),
               leg_f=(-26 * p + _n(rng, 0, 3), _n(rng, 8, 4) + (12 if p > 0 else 0)))
    return place(body, a)


def standing(body, rng):
    arm_n, arm_f = _relaxed_arms(rng)
    a = Angles(torso=_n(rng, 180, 2), head=_n(rng, 0, 5), arm_n=arm_n, arm_f=arm_f,
               leg_n=(_n(rng, 10, 2), _n(rng, 3, 2)), leg_f=(_n(rng, -10, 2), _n(rng, 3, 2)))
    return place(body, a)


def running(body, rng):
    a = Angles(torso=180 - _u(rng, 14, 24), head=_n(rng, -8, 4),
               arm_n=(_n(rng, -45, 8), _n(rng, 95, 8)), arm_f=(_n(rng, 60, 8), _n(rng, 90, 8)),
               leg_n=(_n(rng, 70, 6), _n(rng, 85, 8)), leg_f=(_n(rng, -40, 5), _n(rng, 85, 10)))
    return place(body, a, lift=_u(rng, 0.0, 0.05))


def waving(body, rng):
    wave, rest = (_n(rng, 105, 6), _n(rng, 75, 8)), (_n(rng, 4, 4), _n(rng, 12, 5))
    arm_n, arm_f = (wave, rest) if rng.random() < 0.5 else (rest, wave)  # wave with either hand
    a = Angles(torso=_n(rng, 180, 2), head=_n(rng, -5, 4), arm_n=arm_n, arm_f=arm_f,
               leg_n=(_n(rng, 2, 2), _n(rng, 3, 2)), leg_f=(_n(rng, -2, 2), _n(rng, 3, 2)))
    return place(body, a)


def sitting_bench(body, rng):
    a = Angles(torso=_n(rng, 184, 3), head=_n(rng, 0, 4),
               arm_n=(_n(rng, 40, 6), _n(rng, 55, 8)), arm_f=(_n(rng, 35, 6), _n(rng, 60, 8)),
               leg_n=(_n(rng, 90, 5), _n(rng, 88, 5)), leg_f=(_n(rng, 84, 5), _n(rng, 80, 6)))
    wooden = bool(rng.random() < 0.6)

    def props(j):
        seat_y = j["pelvis"][1] - body.leg_w * 1.1
        ground = lowest(body, j)
        x0, x1 = j["pelvis"][0] - _u(rng, 0.3, 0.45), j["pelvis"][0] + _u(rng, 0.25, 0.4)
        back = seat_y + 0.2
        return [Prop("bench", {"x0": x0, "x1": x1, "seat": seat_y - ground, "back": back - ground, "wooden": wooden},
                     [(x0, ground), (x1, back)])], ground

    return place(body, a, props=props)


def carrying_box(body, rng):
    p = _u(rng, -0.6, 0.6)
    a = Angles(torso=_n(rng, 184, 2), head=_n(rng, 0, 3),
               arm_n=(_n(rng, 48, 5), _n(rng, 62, 6)), arm_f=(_n(rng, 44, 5), _n(rng, 66, 6)),
               leg_n=(20 * p, _n(rng, 8, 4)), leg_f=(-20 * p, _n(rng, 10, 4)))
    w, h = _u(rng, 0.16, 0.22), _u(rng, 0.13, 0.18)

    def props(j):
        cx = max(j["wrist_n"][0], j["wrist_f"][0]) - 0.02
        cy = (j["wrist_n"][1] + j["wrist_f"][1]) / 2 + h * 0.15
        return [Prop("box", {"c_pt": (cx, cy), "w": w, "h": h}, [(cx - w / 2, cy - h / 2), (cx + w / 2, cy + h / 2)],
                     front=True)], None

    return place(body, a, props=props)


def riding_bicycle(body, rng):
    ph = _u(rng, 0, 2 * math.pi)
    a = Angles(torso=180 - _u(rng, 25, 38), head=_n(rng, -25, 4),
               arm_n=(_n(rng, 62, 5), _n(rng, 12, 5)), arm_f=(_n(rng, 58, 5), _n(rng, 15, 5)),
               leg_n=(62 + 22 * math.sin(ph), 62 + 30 * math.cos(ph)),
               leg_f=(62 - 22 * math.sin(ph), 62 - 30 * math.cos(ph)))
    r = _u(rng, 0.16, 0.18)

    def props(j):
        bb = (j["pelvis"][0] + 0.08, min(j["ankle_n"][1], j["ankle_f"][1]) + 0.06)
        ground = bb[1] - r - 0.01
        rear = (j["pelvis"][0] - 0.2, ground + r)
        bar = (j["wrist_n"][0], j["wrist_n"][1] - 0.01)
        front = (bar[0] + 0.09, ground + r)
        seat = (j["pelvis"][0] - 0.02, j["pelvis"][1] - 0.04)
        params = {"rear_pt": rear, "front_pt": front, "bb_pt": bb, "seat_pt": seat, "bar_pt": bar, "r": r}
        pts = [(rear[0] - r, ground), (front[0] + r, ground), bar]
        return [Prop("bicycle", params, pts)], ground

    return place(body, a, props=props)


def phone_call(body, rng):
    arm_f = (_n(rng, -4, 4), _n(rng, 12, 5))
    a = Angles(torso=_n(rng, 180, 2), head=_n(rng, 6, 4),
               arm_n=(_n(rng, 90, 5), _n(rng, 140, 5)), arm_f=arm_f,
               leg_n=(_n(rng, 8, 3), _n(rng, 5, 3)), leg_f=(_n(rng, -4, 2), _n(rng, 3, 2)))

    def props(j):
        w = j["wrist_n"]
        return [Prop("phone", {"c_pt": (w[0] + 0.005, w[1] + 0.015)}, [w], front=True)], None

    return place(body, a, props=props)


def kicking_ball(body, rng):
    a = Angles(torso=_n(rng, 190, 3), head=_n(rng, 10, 4),
               arm_n=(_n(rng, -45, 8), _n(rng, 20, 6)), arm_f=(_n(rng, 65, 8), _n(rng, 20, 6)),
               leg_n=(_n(rng, 72, 6), _n(rng, 12, 6)), leg_f=(_n(rng, -8, 3), _n(rng, 8, 3)))
    r = _u(rng, 0.05, 0.06)

    def props(j):
        toe = j["toe_n"]
        c = (toe[0] + r * 1.2 + _u(rng, 0, 0.08), toe[1] + _u(rng, -0.02, 0.1))
        return [Prop("ball", {"c_pt": c, "r": r, "motion": True}, [(c[0] + r, c[1] + r), (c[0] - r, c[1] - r)])], None

    return place(body, a, props=props)


def stretching(body, rng):
    a = Angles(torso=_n(rng, 180, 2), head=_n(rng, -12, 4),
               arm_n=(_n(rng, 170, 6), _n(rng, 5, 4)), arm_f=(_n(rng, 165, 6), _n(rng, 8, 4)),
               leg_n=(_n(rng, 8, 2), _n(rng, 2, 2)), leg_f=(_n(rng, -8, 2), _n(rng, 2, 2)))
    return place(body, a)


def falling_forward(body, rng):
    a = Angles(torso=180 - _u(rng, 42, 58), head=_n(rng, -30, 6),
               arm_n=(_n(rng, 110, 8), _n(rng, 10, 5)), arm_f=(_n(rng, 125, 8), _n(rng, 12, 5)),
               leg_n=(_n(rng, -10, 6), _n(rng, 25, 6)), leg_f=(_n(rng, -45, 6), _n(rng, 35, 8)))
    return place(body, a, lift=_u(rng, 0.08, 0.16))


def falling_backward(body, rng):
    a = Angles(torso=180 + _u(rng, 35, 50), head=_n(rng, 25, 6),
               arm_n=(_n(rng, 150, 10), _n(rng, 20, 6)), arm_f=(_n(rng, 115, 10), _n(rng, 25, 6)),
               leg_n=(_n(rng, 80, 6), _n(rng, 15, 6)), leg_f=(_n(rng, 60, 6), _n(rng, 30, 6)))
    return place(body, a, lift=_u(rng, 0.1, 0.18))


def lying(body, rng):
    face_down = rng.random() < 0.5
    overhead = rng.random() < 0.4
    a = Angles(torso=(90 if face_down else 270) + _n(rng, 0, 3), head=_n(rng, 0, 5),
               arm_n=((_n(rng, 165, 8), _n(rng, 10, 5)) if overhead else (_n(rng, 8, 5), _n(rng, 8, 5))),
               arm_f=(_n(rng, 20, 8), _n(rng, 15, 6)),
               leg_n=(_n(rng, 6, 4), _n(rng, 6, 4)), leg_f=(_n(rng, -6, 4), _n(rng, 18, 6)))
    return place(body, a)


def slipping(body, rng):
    a = Angles(torso=180 + _u(rng, 14, 24), head=_n(rng, 15, 5),
               arm_n=(_n(rng, 115, 10), _n(rng, 15, 5)), arm_f=(_n(rng, -100, 10), _n(rng, -15, 5)),
               leg_n=(_n(rng, 85, 6), _n(rng, 5, 4)), leg_f=(_n(rng, -5, 5), _n(rng, 55, 8)))
    sign = bool(rng.random() < 0.6)

    def props(j):
        ground = lowest(body, j) - _u(rng, 0.0, 0.03)
        c = (j["ankle_f"][0] + 0.05, ground)
        items = [Prop("puddle", {"c_pt": c, "w": _u(rng, 0.28, 0.4)}, [(c[0] - 0.18, ground), (c[0] + 0.18, ground)])]
        if sign:
            x = j["pelvis"][0] - _u(rng, 0.28, 0.36)
            items.append(Prop("wet_sign", {"x": x, "h": 0.22}, [(x - 0.07, ground), (x + 0.07, ground + 0.22)]))
        return items, ground

    return place(body, a, props=props)


def hit_by_ball(body, rng):
    a = Angles(torso=180 + _u(rng, 12, 22), head=_n(rng, -35, 6),
               arm_n=(_n(rng, 70, 6), _n(rng, 115, 8)), arm_f=(_n(rng, 60, 6), _n(rng, 120, 8)),
               leg_n=(_n(rng, 28, 5), _n(rng, 15, 5)), leg_f=(_n(rng, -22, 5), _n(rng, 20, 5)))
    r = _u(rng, 0.045, 0.06)

    def props(j):
        h = j["head"]
        c = (h[0] + body.head_r + r + _u(rng, 0.0, 0.03), h[1] + _u(rng, -0.02, 0.05))
        return [Prop("ball", {"c_pt": c, "r": r, "motion": True, "impact": True},
                     [(c[0] + r + 0.1, c[1] + r), (c[0] - r, c[1] - r)], front=True)], None

    return place(body, a, props=props)


def fighting(body, rng):
    a = Angles(torso=180 - _u(rng, 8, 16), head=_n(rng, -8, 4),
               arm_n=(_n(rng, 90, 5), _n(rng, 5, 4)), arm_f=(_n(rng, 40, 6), _n(rng, 120, 8)),
               leg_n=(_n(rng, 38, 5), _n(rng, 25, 5)), leg_f=(_n(rng, -30, 5), _n(rng, 10, 4)))
    fig = place(body, a)
    other_angles = Angles(torso=180 + _u(rng, 10, 22), head=_n(rng, -15, 6),
                          arm_n=(_n(rng, 60, 8), _n(rng, 110, 10)), arm_f=(_n(rng, 100, 10), _n(rng, 40, 10)),
                          leg_n=(_n(rng, 20, 5), _n(rng, 15, 5)), leg_f=(_n(rng, -25, 5), _n(rng, 10, 5)))
    other = place(BUILDS[("slim", "average", "stocky", "tall")[int(rng.integers(4))]], other_angles)
    dx = fig.joints["wrist_n"][0] + _u(rng, 0.1, 0.16)  # the opponent stands where the punch lands
    other.joints = {k: (dx - x, y) for k, (x, y) in other.joints.items()}
    other.mirrored = True
    fig.others.append(other)
    return fig


def climbing_fence(body, rng):
    a = Angles(torso=180 - _u(rng, 5, 14), head=_n(rng, -15, 5),
               arm_n=(_n(rng, 160, 6), _n(rng, 15, 6)), arm_f=(_n(rng, 150, 6), _n(rng, 25, 6)),
               leg_n=(_n(rng, 100, 6), _n(rng, 105, 8)), leg_f=(_n(rng, 5, 5), _n(rng, 30, 8)))
    lift = _u(rng, 0.18, 0.3)

    def props(j):
        ground = lowest(body, j) - lift
        top = max(j["wrist_n"][1], j["wrist_f"][1]) - 0.015
        x = max(j["toe_n"][0], j["knee_n"][0]) + 0.01
        return [Prop("fence", {"x": x, "top": top - ground, "chain": bool(rng.random() < 0.5)},
                     [(x - 0.05, ground), (x + 0.05, top)])], ground

    return place(body, a, props=props)


def jumping_height(body, rng):
    a = Angles(torso=180 - _u(rng, 0, 12), head=_n(rng, -10, 5),
               arm_n=(_n(rng, 140, 10), _n(rng, 20, 8)), arm_f=(_n(rng, 120, 10), _n(rng, 30, 8)),
               leg_n=(_n(rng, 55, 8), _n(rng, 75, 8)), leg_f=(_n(rng, 35, 8), _n(rng, 70, 8)))
    lift = _u(rng, 0.3, 0.5)

    def props(j):
        ground = lowest(body, j) - lift
        top = lowest(body, j) + _u(rng, 0.3, 0.5)
        x1 = j["pelvis"][0] - _u(rng, 0.14, 0.2)
        x0 = x1 - _u(rng, 0.25, 0.4)
        return [Prop("ledge", {"x0": x0, "x1": x1, "top": top - ground}, [(x0, ground), (x1, top)])], ground

    return place(body, a, props=props)


def crawling(body, rng):
    a = Angles(torso=_n(rng, 95, 4), head=_n(rng, 45, 8),
               arm_n=(_n(rng, 100, 6), _n(rng, 5, 4)), arm_f=(_n(rng, 80, 6), _n(rng, 5, 4)),
               leg_n=(_n(rng, 100, 6), _n(rng, 95, 6)), leg_f=(_n(rng, 80, 6), _n(rng, 85, 6)))
    return place(body, a)


def collapsing(body, rng):
    a = Angles(torso=180 - _u(rng, 20, 35), head=_n(rng, 40, 8),
               arm_n=(_n(rng, 25, 6), _n(rng, 120, 8)), arm_f=(_n(rng, -5, 6), _n(rng, 5, 5)),
               leg_n=(_n(rng, 95, 6), _n(rng, 140, 6)), leg_f=(_n(rng, 70, 6), _n(rng, 135, 6)))
    return place(body, a)


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    behaviour: str  # "normal" or "anomaly"
    pose: Callable[[Body, np.random.Generator], Figure]


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in [
        Action("walking", "normal", walking),
        Action("standing", "normal", standing),
        Action("running", "normal", running),
        Action("waving", "normal", waving),
        Action("sitting on a bench", "normal", sitting_bench),
        Action("carrying a box", "normal", carrying_box),
        Action("riding a bicycle", "normal", riding_bicycle),
        Action("talking on a phone", "normal", phone_call),
        Action("kicking a ball", "normal", kicking_ball),
        Action("stretching", "normal", stretching),
        Action("falling forward", "anomaly", falling_forward),
        Action("falling backward", "anomaly", falling_backward),
        Action("lying on the ground", "anomaly", lying),
        Action("slipping", "anomaly", slipping),
        Action("hit by a ball", "anomaly", hit_by_ball),
        Action("fighting", "anomaly", fighting),
        Action("climbing a fence", "anomaly", climbing_fence),
        Action("jumping from a height", "anomaly", jumping_height),
        Action("crawling", "anomaly", crawling),
        Action("collapsing", "anomaly", collapsing),
    ]
}
NORMAL_ACTIONS = tuple(n for n, a in ACTIONS.items() if a.behaviour == "normal")
ANOMALY_ACTIONS = tuple(n for n, a in ACTIONS.items() if a.behaviour == "anomaly")


def pose_for(action: str, build: str, rng: np.random.Generator) -> Figure:
    """A randomly varied figure performing ``action``, randomly facing left or right."""
    fig = ACTIONS[action].pose(BUILDS[build], rng)
    if rng.random() < 0.5:
        fig = mirror(fig)
    return fig


def mirror(fig: Figure) -> Figure:
    """Flip a figure (and its props and partners) horizontally."""
    flip = lambda p: (-p[0], p[1])  # noqa: E731
    props = []
    for prop in fig.props:
        params = dict(prop.params)
        for k, v in prop.params.items():
            if k.endswith("_pt"):
                params[k] = flip(v)
            elif k in ("x", "x0", "x1"):
                params[k] = -v
        if "x0" in params:
            params["x0"], params["x1"] = params["x1"], params["x0"]
        params["mirrored"] = not prop.params.get("mirrored", False)
        props.append(Prop(prop.kind, params, [flip(p) for p in prop.points], prop.front))
    others = [mirror(o) for o in fig.others]
    return Figure({k: flip(p) for k, p in fig.joints.items()}, fig.body, props, others, not fig.mirrored)
