"""Synthetic street scenes: a label map (train ids) and an RGB image, a pure function of the seed.

Each scene has sky on top, buildings / walls / fences / vegetation along a random horizon, road
with sidewalks and terrain below, poles carrying traffic lights and signs, and vehicles, people
and two-wheelers standing on the ground, drawn back to front (so near objects occlude far ones)
and sized by their distance. Every class has its own colour and texture (with per-object and
per-image jitter, pixel noise and JPEG compression), so a network has to learn colour, texture
and context, yet a small one reaches a useful mIoU in minutes. Some pixels are 255: an ego-vehicle
hood and unlabelled blobs, which `render_scene_regions` also reports apart (VOID_EGO, VOID_CLUTTER)
so that a layout with raw label ids can give them their own ids.

`render_drivable_scene` renders the same scene (the same random draws, so the same street) with
lanes: the road is cut into 2 or 4 lanes, drawn with dashed markings, and labelled as BDD100K's
drivable area (the ego lane's road direct, the other lanes' road alternative, the rest background).
The lanes come from a second generator and are drawn after the street, so the street scenes of the
other toy sets stay byte for byte what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

IGNORE = 255
# Codes of the unlabelled regions in the void map: 0 labelled, 1 the ego vehicle, 2 + k the k-th
# clutter blob.
VOID_EGO = 1
VOID_CLUTTER = 2

# Appearance (not label) colours where the label palette's colours are too close to tell apart in
# a toy scene; every other class is drawn in its palette colour.
_APPEARANCE = {
    "wall": (120, 110, 170),
    "pole": (175, 175, 160),
    "truck": (30, 30, 90),
    "bus": (0, 120, 150),
    "train": (60, 100, 60),
    "rider": (255, 120, 0),
    "bicycle": (150, 60, 200),
}
# (texture, amplitude) per class; textures are made in `_textures`.
_TEXTURE = {
    "road": ("blotch", 10),
    "sidewalk": ("tiles", 18),
    "building": ("windows", 35),
    "wall": ("bricks", 18),
    "fence": ("slats", 40),
    "pole": ("vgrad", 12),
    "traffic light": ("lamps", 60),
    "traffic sign": ("flat", 0),
    "vegetation": ("leaves", 35),
    "terrain": ("blotch", 20),
    "sky": ("vgrad", 25),
    "person": ("flat", 0),
    "rider": ("flat", 0),
    "car": ("vgrad", 20),
    "truck": ("panels", 20),
    "bus": ("band", 40),
    "train": ("stripe", 50),
    "motorcycle": ("grain", 20),
    "bicycle": ("grain", 20),
}


def _textures(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    """Texture fields in about [-1, 1], one per pattern name, for one image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = max(w / 256, 1.0)

    def lowfreq(cells: int) -> np.ndarray:
        small = rng.standard_normal((cells, cells * 2)).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(-2, 2) / 2

    grain = rng.standard_normal((h, w)).astype(np.float32).clip(-2.5, 2.5) / 2.5
    win = int(4 * s)
    return {
        "flat": np.zeros((h, w), np.float32),
        "grain": grain,
        "blotch": lowfreq(6) + 0.3 * grain,
        "leaves": 0.6 * cv2.GaussianBlur(grain, (3, 3), 0.8) * 2 + 0.4 * lowfreq(10),
        "vgrad": 1 - 2 * yy / h,
        "tiles": np.where((xx % (6 * s) < s) | (yy % (4 * s) < s), -1.0, 0.3).astype(np.float32),
        "windows": np.where((xx % (2 * win) < win) & (yy % (2 * win) < win), -1.0, 0.4).astype(
            np.float32
        ),
        "bricks": np.where(yy % (3 * s) < s, -1.0, 0.3).astype(np.float32),
        "slats": np.sin(2 * np.pi * xx / (4 * s)).astype(np.float32),
        "lamps": np.where(yy % (5 * s) < 3 * s, 1.0, -1.0).astype(np.float32),
        "panels": np.where(xx % (8 * s) < s, -1.0, 0.2).astype(np.float32),
        "band": np.where(yy % (12 * s) < 4 * s, -1.0, 0.3).astype(np.float32),
        "stripe": np.where(yy % (10 * s) < 2 * s, 1.0, -0.3).astype(np.float32),
    }


class _Scene:
    """Paints one scene: a label map and a float RGB canvas, shape by shape."""

    def __init__(
        self,
        rng: np.random.Generator,
        h: int,
        w: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
    ):
        self.rng, self.h, self.w = rng, h, w
        self.s = w / 256  # size unit: pixels at the default 256-pixel width
        self.ids = {name: i for i, name in enumerate(class_names)}
        self.colour = {
            n: np.array(_APPEARANCE.get(n, palette[i]), np.float32) for n, i in self.ids.items()
        }
        self.tex = _textures(rng, h, w)
        self.label = np.full((h, w), IGNORE, np.uint8)
        self.void = np.zeros((h, w), np.uint8)  # which unlabelled region a 255 pixel belongs to
        self.image = np.zeros((h, w, 3), np.float32)

    def paint(
        self, cls: str | None, draw, colour: np.ndarray | None = None, void: int = VOID_CLUTTER
    ) -> None:
        """Fill the pixels `draw(canvas)` marks with class `cls` (None: 255, region `void`) and
        its look."""
        region = np.zeros((self.h, self.w), np.uint8)
        draw(region)
        sel = region > 0
        if not sel.any():
            return
        if cls is None:
            self.label[sel] = IGNORE
            self.void[sel] = void
            self.image[sel] = colour if colour is not None else self.rng.uniform(0, 255, 3)
            return
        jitter = self.rng.uniform(-15, 15, 3).astype(np.float32)
        base = (self.colour[cls] if colour is None else colour) + jitter
        pattern, amp = _TEXTURE.get(cls, ("grain", 15))
        self.label[sel] = self.ids[cls]
        self.void[sel] = 0
        self.image[sel] = base + amp * self.tex[pattern][sel][:, None]

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def ri(self, lo: float, hi: float) -> int:
        return round(self.rng.uniform(lo, hi))


def _rect(x1: float, y1: float, x2: float, y2: float):
    return lambda c: cv2.rectangle(c, (int(x1), int(y1)), (int(x2), int(y2)), 1, -1)


def _ellipse(cx: float, cy: float, ax: float, ay: float):
    return lambda c: cv2.ellipse(
        c, (int(cx), int(cy)), (max(int(ax), 1), max(int(ay), 1)), 0, 0, 360, 1, -1
    )


def _poly(points: Sequence[Sequence[float]]):
    pts = np.array(points, np.int32).reshape(-1, 1, 2)
    return lambda c: cv2.fillPoly(c, [pts], 1)


def _draw_background(sc: _Scene) -> tuple[int, float, float, float]:
    """Sky, skyline, ground; returns the horizon row and the road's edges (vp, left, right)."""
    h, w, s = sc.h, sc.w, sc.s
    hor = sc.ri(0.38 * h, 0.5 * h)
    sc.paint("sky", _rect(0, 0, w, hor))
    # Skyline: buildings, then walls / fences / vegetation in front of their base.
    x = -sc.u(0, 20 * s)
    while x < w:
        bw = sc.u(25 * s, 60 * s)
        sc.paint("building", _rect(x, sc.u(0.05 * h, hor - 0.12 * h), x + bw, hor + 2))
        x += bw + sc.u(0, 12 * s)
    for _ in range(sc.ri(1, 4)):
        cx, cw = sc.u(0, w), sc.u(15 * s, 50 * s)
        sc.paint("vegetation", _ellipse(cx, hor - sc.u(5, 15) * s, cw / 2, sc.u(10, 22) * s))
    for cls, height in (("wall", (8, 14)), ("fence", (7, 12))):
        for _ in range(sc.ri(1, 2)):
            x1 = sc.u(0, w * 0.8)
            sc.paint(cls, _rect(x1, hor - sc.u(*height) * s, x1 + sc.u(25, 70) * s, hor + 1))
    # Ground: terrain everywhere, sidewalks along the road, the road in the middle.
    sc.paint("terrain", _rect(0, hor, w, h))
    vp = sc.u(0.35 * w, 0.65 * w)
    left, right = sc.u(-0.25 * w, 0.15 * w), sc.u(0.85 * w, 1.25 * w)
    walk = sc.u(0.15, 0.3) * w
    sc.paint(
        "sidewalk",
        _poly([(vp - 12 * s, hor), (vp + 12 * s, hor), (right + walk, h), (left - walk, h)]),
    )
    sc.paint("road", _poly([(vp - 4 * s, hor), (vp + 4 * s, hor), (right, h), (left, h)]))
    # Dashed centre line: still road (texture the network must not mistake for a class).
    for t in np.linspace(0.15, 0.9, 4):
        y, yb = hor + t * (h - hor), hor + (t + 0.08) * (h - hor)
        xc = vp + t * ((left + right) / 2 - vp)
        sc.paint(
            "road",
            _rect(xc - s * (1 + 2 * t), y, xc + s * (1 + 2 * t), yb),
            colour=np.array([225, 225, 215], np.float32),
        )
    return hor, vp, left, right


def _object(sc: _Scene, kind: str, x: float, y: float, k: float) -> None:
    """One thing standing on the ground at (x, y) (bottom centre), scaled by depth factor k."""
    s = sc.s * k
    if kind == "pole":
        pw, top = max(sc.u(3, 5) * sc.s * max(k, 0.8), 3), y - sc.u(55, 80) * s
        sc.paint("pole", _rect(x - pw / 2, top, x + pw / 2, y))
        if sc.rng.random() < 0.6:
            lw, lh = max(7 * s, 6), max(16 * s, 13)
            sc.paint("traffic light", _rect(x - lw / 2, top - 2, x + lw / 2, top + lh))
        if sc.rng.random() < 0.7:
            size = max(sc.u(9, 13) * s, 8)
            yc = top + sc.u(20, 30) * s
            shape = sc.rng.integers(3)
            draw = (
                _rect(x - size / 2, yc - size / 2, x + size / 2, yc + size / 2)
                if shape == 0
                else _ellipse(x, yc, size / 2, size / 2)
                if shape == 1
                else _poly(
                    [
                        (x - size / 2, yc - size / 2),
                        (x + size / 2, yc - size / 2),
                        (x, yc + size / 2),
                    ]
                )
            )
            sc.paint("traffic sign", draw)
    elif kind in ("car", "truck", "bus"):
        bw, bh = {"car": (40, 18), "truck": (50, 32), "bus": (70, 34)}[kind]
        bw, bh = bw * s * sc.u(0.85, 1.15), bh * s * sc.u(0.9, 1.1)
        sc.paint(kind, _rect(x - bw / 2, y - bh, x + bw / 2, y - 3 * s))
        if kind == "car":  # cabin
            sc.paint(kind, _rect(x - bw / 3, y - bh * 1.6, x + bw / 4, y - bh))
        for dx in (-bw / 3, bw / 3):  # wheels: part of the vehicle
            sc.paint(
                kind,
                _ellipse(x + dx, y - 3 * s, 5 * s, 4 * s),
                colour=np.array([25, 25, 25], np.float32),
            )
    elif kind == "train":
        bw, bh = sc.u(120, 200) * s, 30 * s
        sc.paint("train", _rect(x - bw / 2, y - bh, x + bw / 2, y))
    elif kind == "person":
        ph, pw = sc.u(30, 40) * s, sc.u(9, 12) * s
        sc.paint("person", _rect(x - pw / 2, y - ph * 0.8, x + pw / 2, y))
        sc.paint("person", _ellipse(x, y - ph * 0.85, pw * 0.4, ph * 0.12))
    elif kind in ("motorcycle", "bicycle"):
        vw, vh = sc.u(24, 30) * s, sc.u(13, 16) * s
        thick = max(int(3 * s), 3) if kind == "bicycle" else -1
        for dx in (-vw / 3, vw / 3):
            cx, cy, r = int(x + dx), int(y - vh / 3), max(int(vh / 3), 2)
            sc.paint(kind, lambda c, cx=cx, cy=cy, r=r: cv2.circle(c, (cx, cy), r, 1, thick))
        body = 0.75 if kind == "bicycle" else 0.9  # the motorcycle's engine block is bigger
        sc.paint(kind, _rect(x - vw / 3, y - vh * body, x + vw / 3, y - vh * 0.4))
        if sc.rng.random() < 0.85:
            rw, rh = sc.u(9, 12) * s, sc.u(22, 28) * s
            sc.paint("rider", _rect(x - rw / 2, y - vh * 0.6 - rh * 0.8, x + rw / 2, y - vh * 0.5))
            sc.paint("rider", _ellipse(x, y - vh * 0.6 - rh * 0.9, rw * 0.4, rh * 0.14))


def _draw_scene(sc: _Scene) -> tuple[int, float, float, float]:
    """The whole street; returns the road's geometry (horizon row, vp, left, right)."""
    h, w = sc.h, sc.w
    hor, vp, left, right = _draw_background(sc)
    things: list[tuple[float, str, float]] = []  # (ground row, kind, x)
    depth = lambda t: hor + t * (h - hor)  # noqa: E731 - tiny local helper

    def road_x(t: float) -> float:
        return vp + t * (sc.u(left, right) - vp)

    for _ in range(sc.ri(2, 4)):  # poles on the sidewalks, both sides
        t = sc.u(0.3, 0.8)
        side = left if sc.rng.random() < 0.5 else right
        things.append((depth(t), "pole", vp + t * (side - vp) + sc.u(-8, 8) * sc.s))
    for kind, n in (
        ("car", (1, 3)),
        ("truck", (0, 1)),
        ("bus", (0, 1)),
        ("person", (1, 3)),
        ("motorcycle", (0, 2)),
        ("bicycle", (0, 2)),
    ):
        for _ in range(sc.ri(*n)):
            t = sc.u(0.35, 0.95)
            x = (
                road_x(t)
                if kind not in ("person",)
                else vp
                + t * ((left if sc.rng.random() < 0.5 else right) - vp)
                + sc.u(-10, 10) * sc.s
            )
            things.append((depth(t), kind, x))
    if sc.rng.random() < 0.4:
        things.append((depth(sc.u(0.05, 0.15)), "train", sc.u(0.2, 0.8) * w))
    for y, kind, x in sorted(things):  # far first: near things occlude far ones
        _object(sc, kind, x, y, 0.5 + (y - hor) / (h - hor))
    for k in range(sc.ri(0, 2)):  # unlabelled clutter
        blob = _ellipse(sc.u(0, w), sc.u(hor, h), sc.u(4, 12) * sc.s, sc.u(3, 8) * sc.s)
        sc.paint(None, blob, void=VOID_CLUTTER + k)
    if sc.rng.random() < 0.5:  # ego-vehicle hood
        sc.paint(
            None,
            _ellipse(w / 2, h + sc.u(0, 6) * sc.s, w * 0.6, sc.u(12, 20) * sc.s),
            colour=np.array([30, 30, 35], np.float32),
            void=VOID_EGO,
        )
    return hor, vp, left, right


# Drivable-area ids (BDD100K's): the ego lane, the other lanes, everything else.
DIRECT, ALTERNATIVE, BACKGROUND = 0, 1, 2
_MARKING = np.array([225, 225, 215], np.float32)  # the colour of the centre line's dashes


def _draw_lanes(
    sc: _Scene, road: tuple[int, float, float, float], lane_rng: np.random.Generator
) -> np.ndarray:
    """Cut the road into 2 or 4 lanes (the centre line is always a lane border), draw dashed
    markings on the visible road and return the drivable-area map. Uses only `lane_rng`."""
    hor, vp, left, right = road
    h, w, s = sc.h, sc.w, sc.s
    lanes = int(lane_rng.choice([2, 4]))
    bottoms = [left + k * (right - left) / lanes for k in range(1, lanes)]  # borders at row h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.clip((yy - hor) / (h - hor), 0, None)
    lane = sum((xx >= vp + t * (b - vp)).astype(np.uint8) for b in bottoms)
    # The ego lane is the one straight ahead: the camera looks along the road, so the lane below
    # the vanishing point, between a border leaning right (/) and one leaning left (\).
    ego = sum(int(vp >= b) for b in bottoms)
    road_pixels = sc.label == sc.ids["road"]
    drivable = np.full((h, w), BACKGROUND, np.uint8)
    drivable[road_pixels] = np.where(lane[road_pixels] == ego, DIRECT, ALTERNATIVE)
    marks = np.zeros((h, w), np.uint8)
    dash = lane_rng.uniform(0.06, 0.1)  # dash length, as a fraction of the road's depth

    def edge(b: float, t: float, side: int) -> tuple[float, float]:
        """A point of a marking's side edge at depth t: the line toward vp, widening with t."""
        return vp + t * (b - vp) + side * s * (0.8 + 2.5 * t), hor + t * (h - hor)

    for b in bottoms:
        for t0 in np.arange(lane_rng.uniform(0, 0.1), 1.0, 1.6 * dash):
            t1 = t0 + dash  # each dash follows the border's slant: its lean shows the lane's side
            _poly([edge(b, t0, -1), edge(b, t0, 1), edge(b, t1, 1), edge(b, t1, -1)])(marks)
    painted = (marks > 0) & road_pixels  # only where the road is seen: objects stay in front
    sc.image[painted] = _MARKING
    return drivable


def _render(
    rng: np.random.Generator,
    height: int,
    width: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    lane_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(image, label map, void map, drivable map or None without `lane_rng`)."""
    sc = _Scene(rng, height, width, class_names, palette)
    road = _draw_scene(sc)
    drivable = _draw_lanes(sc, road, lane_rng) if lane_rng is not None else None
    img = sc.image * sc.rng.uniform(0.85, 1.15) + sc.rng.uniform(-20, 20)  # per-image jitter
    img += sc.rng.uniform(-10, 10, 3)  # colour cast
    img += sc.rng.normal(0, 5, img.shape)
    img = cv2.GaussianBlur(img.clip(0, 255), (3, 3), 0.5)
    return img.round().astype(np.uint8), sc.label, sc.void, drivable


def render_scene_regions(
    rng: np.random.Generator,
    height: int,
    width: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic (RGB uint8 image, uint8 label map, uint8 void map) triple; the void map codes
    the 255 pixels' regions (VOID_EGO, VOID_CLUTTER + k, 0 elsewhere)."""
    return _render(rng, height, width, class_names, palette)[:3]


def render_drivable_scene(
    rng: np.random.Generator,
    lane_rng: np.random.Generator,
    height: int,
    width: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The scene `rng` draws (street classes `class_names`, which must include "road") with lanes
    from `lane_rng`: (RGB uint8 image, uint8 drivable map of DIRECT / ALTERNATIVE / BACKGROUND)."""
    if "road" not in class_names:
        raise ValueError("a drivable scene needs a 'road' class among the street classes")
    image, _, _, drivable = _render(rng, height, width, class_names, palette, lane_rng)
    return image, drivable


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (RGB uint8 image, uint8 label map) pair."""
    return render_scene_regions(rng, height, width, class_names, palette)[:2]
