"""Procedural street scenes with pixel labels: the embedded default data of fedmerge.

Every scene is a pinhole view from a car: a horizon, a perspective road with sidewalks,
facades whose windows follow the street, and trees, poles, signs, cars and persons whose
size follows their depth. Geometry lives in camera-height units: a ground point at
lateral offset X and image row y sits at column ``vx + X * (y - horizon)``, so everything
scales with depth for free.

A style is a layout (object statistics) plus an appearance (what weather or sensor does
to the clean render). Scene randomness is drawn from ``(seed, index, layout)`` and the
appearance from ``(seed, index, style)``, so fog image 7 shows exactly the scene of source
image 7; only "rain" deliberately changes the layout (lower horizon, more cars, fewer
pedestrians), as a label-distribution shift on top of the appearance shift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data.classes import SYNTHETIC_CLASSES

__all__ = [
    "DEFAULT_SIZE",
    "LAYOUTS",
    "SYNTHETIC_STYLES",
    "Layout",
    "SyntheticDataset",
    "render",
    "write_synthetic_folder",
]

DEFAULT_SIZE = (96, 128)
DEFAULT_IMAGES_PER_DOMAIN = 48
SYNTHETIC_STYLES = ("source", "fog", "night", "rain", "snow", "tint", "noise")

SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PERSON, POLE, SIGN = range(len(SYNTHETIC_CLASSES))
_FAR = 1e3  # relative depth of the sky


@dataclass(frozen=True)
class Layout:
    """Scene statistics: the horizon row range (fraction of height) and object counts."""

    horizon: tuple[float, float] = (0.34, 0.5)
    cars: tuple[int, int] = (1, 5)
    car_depth: tuple[float, float] = (1.1, 12.0)
    persons: tuple[int, int] = (1, 5)
    poles: tuple[int, int] = (2, 5)
    trees: tuple[int, int] = (1, 5)
    building_prob: float = 0.85


LAYOUTS: dict[str, Layout] = {
    "default": Layout(),
    # Rainy traffic: horizon lower in the frame, more and nearer cars, few walkers.
    "rain": Layout(horizon=(0.46, 0.6), cars=(4, 9), car_depth=(1.1, 7.0), persons=(0, 2)),
}
_STYLE_LAYOUT = {"rain": "rain"}


@dataclass
class Canvas:
    """A render in progress: the image, its labels, and what the weather styles need.

    ``depth`` is distance relative to the bottom image row (1 there, large near the horizon),
    ``lateral`` the ground's X in camera heights from the road centre, ``lights`` the pixels
    that glow at night (windows, tail lights), ``lamps`` (row, col, radius) of lamp heads.
    """

    image: np.ndarray
    label: np.ndarray
    depth: np.ndarray
    lateral: np.ndarray
    horizon: float
    lights: np.ndarray
    lamps: list[tuple[float, float, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Unit-variance value noise with feature size ``cell`` px (bilinear over a coarse grid)."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ys, xs = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


@dataclass(frozen=True)
class _Box:
    """The clipped bounding box of an object, with pixel-centre coordinates inside it."""

    ys: slice
    xs: slice
    yy: np.ndarray
    xx: np.ndarray


def _box(canvas: Canvas, top: float, bottom: float, left: float, right: float) -> _Box | None:
    h, w = canvas.label.shape
    y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), h)
    x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), w)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    return _Box(slice(y0, y1), slice(x0, x1), yy, xx)


def _paint(canvas: Canvas, box: _Box, mask: np.ndarray, color: np.ndarray, cls: int, depth: float) -> None:
    """Paint ``color`` (RGB or a per-pixel HxWx3 array over the box) where ``mask`` holds."""
    if not mask.any():
        return
    img = canvas.image[box.ys, box.xs]
    col = np.broadcast_to(color, img.shape)
    img[mask] = col[mask]
    canvas.label[box.ys, box.xs][mask] = cls
    canvas.depth[box.ys, box.xs][mask] = depth


def _rect(box: _Box, left: float, right: float, top: float, bottom: float) -> np.ndarray:
    """A rectangle at least one pixel wide and tall, so far objects never vanish."""
    if right - left < 1.0:
        mid = (left + right) / 2
        left, right = mid - 0.5, mid + 0.5
    if bottom - top < 1.0:
        mid = (top + bottom) / 2
        top, bottom = mid - 0.5, mid + 0.5
    return (box.xx >= left) & (box.xx < right) & (box.yy >= top) & (box.yy < bottom)


def _ellipse(box: _Box, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    ry, rx = max(ry, 0.6), max(rx, 0.6)
    return ((box.yy - cy) / ry) ** 2 + ((box.xx - cx) / rx) ** 2 <= 1.0


def _shade(color: np.ndarray, box: _Box, top: float, bottom: float, amount: float) -> np.ndarray:
    """Darken toward the bottom: a cheap stand-in for light from the sky."""
    t = np.clip((box.yy - top) / max(bottom - top, 1.0), 0, 1)[..., None]
    return color * (1.0 - amount * t)


def _hsv_color(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)
    rgb = np.clip(np.abs(((h * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)
    return (v * (1 - s + s * rgb)).astype(np.float32)


# ----------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class _Street:
    """The ground geometry every object is placed against (units: camera heights)."""

    horizon: float  # image row of the horizon
    vx: float  # column of the vanishing point
    centre: float  # road centre X relative to the camera
    road: float  # half width of the road
    walk: float  # sidewalk width
    verge: float  # grass between sidewalk and facades
    ground_rows: float  # rows from horizon to the bottom edge

    def scale_at(self, depth: float) -> float:
        """Pixels per camera height at relative depth ``depth`` (1 = bottom row)."""
        return self.ground_rows / depth

    def project(self, x: float, depth: float) -> tuple[float, float]:
        """(row, col) of the ground point at lateral X ``x`` and relative depth ``depth``."""
        s = self.scale_at(depth)
        return self.horizon + s, self.vx + x * s


def _sample_street(rng: np.random.Generator, h: int, w: int, layout: Layout) -> _Street:
    horizon = rng.uniform(*layout.horizon) * h
    road = rng.uniform(1.2, 2.4)
    return _Street(
        horizon=horizon,
        vx=rng.uniform(0.3, 0.7) * w,
        centre=rng.uniform(-0.5, 0.5) * road,
        road=road,
        walk=rng.uniform(0.6, 1.6),
        verge=rng.choice([0.0, rng.uniform(0.3, 1.5)]),
        ground_rows=h - horizon,
    )


def _draw_sky(canvas: Canvas, rng: np.random.Generator, st: _Street) -> None:
    h, w = canvas.label.shape
    overcast = rng.uniform(0, 1)
    zenith = (1 - overcast) * np.array([0.25, 0.45, 0.85]) + overcast * np.array([0.62, 0.66, 0.72])
    near_horizon = zenith * 0.55 + 0.42
    t = np.clip((np.arange(h, dtype=np.float32)[:, None] + 0.5) / max(st.horizon, 1), 0, 1)[..., None]
    sky = zenith * (1 - t) + near_horizon * t
    clouds = np.clip(_smooth_noise(rng, h, w, rng.uniform(8, 24)) * 0.6 + rng.uniform(-0.6, 0.3), 0, 1)[..., None]
    sky = sky * (1 - 0.7 * clouds) + 0.9 * 0.7 * clouds
    canvas.image[:] = sky.astype(np.float32)


def _draw_ground(canvas: Canvas, rng: np.random.Generator, st: _Street) -> None:
    h, w = canvas.label.shape
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    rows = yy - st.horizon
    ground = np.broadcast_to(rows > 0.5, (h, w))
    scale = np.maximum(rows, 0.5)
    lateral = (xx - st.vx) / scale - st.centre
    along = st.ground_rows / scale  # relative depth, used for texture along the street
    side = np.abs(lateral)
    road, walk = side < st.road, (side >= st.road) & (side < st.road + st.walk)

    asphalt = rng.uniform(0.22, 0.45) * np.array([1.0, 1.0, rng.uniform(1.0, 1.12)], dtype=np.float32)
    fine = rng.standard_normal((h, w)).astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = asphalt
    img *= (1 + 0.08 * fine + 0.1 * _smooth_noise(rng, h, w, 10))[..., None]
    lanes = st.road / rng.choice([1.0, 2.0])
    marks = (np.abs(_frac((lateral + st.road) / lanes + 0.5) - 0.5) * lanes < 0.06) & (_frac(along * 1.5) < 0.5)
    marks |= np.abs(side - st.road + 0.15) < 0.05  # edge lines
    img[marks & road] = rng.uniform(0.75, 0.92)

    stone = np.array(rng.choice([[0.62, 0.6, 0.58], [0.66, 0.52, 0.46], [0.72, 0.68, 0.6], [0.5, 0.5, 0.52]]))
    seams = (_frac(lateral / 0.45) < 0.08) | (_frac(along * 3.0) < 0.12)
    tiles = stone * (1 - 0.25 * seams[..., None]) * (1 + 0.05 * fine[..., None])
    curb = (side >= st.road) & (side < st.road + 0.12)
    tiles[curb] = 0.8
    img[walk] = tiles[walk]

    grass = np.array([0.25, 0.45, 0.15]) * rng.uniform(0.8, 1.2) + np.array([0.1, 0.05, 0]) * rng.uniform(0, 1)
    blades = (1 + 0.25 * fine + 0.2 * _smooth_noise(rng, h, w, 3))[..., None]
    verge = ~(road | walk)
    img[verge] = (grass * blades)[verge]

    label = np.where(road, ROAD, np.where(walk, SIDEWALK, VEGETATION))
    canvas.image[ground] = img[ground]
    canvas.label[ground] = label[ground]
    canvas.depth[ground] = np.broadcast_to(along, (h, w))[ground]
    canvas.lateral[:] = np.where(ground, lateral, np.inf)


def _draw_far_band(canvas: Canvas, rng: np.random.Generator, st: _Street) -> None:
    """Distant city or treeline on the horizon, so the horizon is not a clean sky/ground edge."""
    kind = rng.choice(["city", "trees", "none"], p=[0.6, 0.3, 0.1])
    if kind == "none":
        return
    h, w = canvas.label.shape
    height = h * rng.uniform(0.03, 0.1) * np.clip(1 + 0.6 * _smooth_noise(rng, 1, w, rng.uniform(4, 16))[0], 0.1, 3)
    if kind == "city":
        height = np.repeat(height[:: max(w // 24, 1)], max(w // 24, 1))[:w]
        height = np.pad(height, (0, w - len(height)), mode="edge")
    box = _box(canvas, 0, st.horizon + 0.5, 0, w)
    if box is None:
        return
    mask = (box.yy >= st.horizon - height[None, :]) & (box.yy < st.horizon + 0.5)
    base = rng.uniform(0.45, 0.6) * np.array([0.95, 1.0, 1.08]) if kind == "city" else np.array([0.25, 0.35, 0.22])
    tex = base * (1 + 0.08 * rng.standard_normal((*mask.shape, 1)))
    _paint(canvas, box, mask, tex.astype(np.float32), BUILDING if kind == "city" else VEGETATION, 80.0)


def _draw_facades(canvas: Canvas, rng: np.random.Generator, st: _Street, layout: Layout) -> None:
    h, w = canvas.label.shape
    xx = np.arange(w, dtype=np.float32) + 0.5
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    for side in (-1.0, 1.0):
        if rng.uniform() > layout.building_prob:
            continue
        x_face = st.centre + side * (st.road + st.walk + st.verge)
        scale = (xx - st.vx) / x_face  # pixels per camera height of the facade foot, per column
        valid = scale > 0.4
        depth = st.ground_rows / np.maximum(scale, 1e-3)
        edges = np.cumsum(rng.uniform(1.0, 5.0, size=64)) * rng.uniform(0.6, 1.0)
        seg = np.minimum(np.searchsorted(edges, depth), 63)
        heights = np.where(rng.uniform(size=64) < 0.15, 0.0, rng.uniform(2.0, 9.0, size=64))
        palette = np.array([[0.55, 0.5, 0.45], [0.62, 0.38, 0.3], [0.75, 0.72, 0.62], [0.45, 0.45, 0.48]])
        colors = palette[rng.integers(0, len(palette), size=64)] * rng.uniform(0.75, 1.15, size=(64, 1))
        foot = st.horizon + scale
        top = foot - heights[seg] * scale
        mask = valid[None, :] & (yy >= top[None, :]) & (yy < foot[None, :])
        up = (foot[None, :] - yy) / np.maximum(scale[None, :], 1e-3)  # height above ground, camera heights
        pitch, floor = rng.uniform(0.7, 1.4), rng.uniform(1.6, 2.4)
        px_per_window = pitch * scale**2 * abs(x_face) / st.ground_rows
        windows = (
            (np.abs(_frac(depth / pitch)[None, :] - 0.5) < 0.22)
            & (np.abs(_frac(up / floor) - 0.55) < 0.2)
            & (up > 1.2)
            & (up < heights[seg][None, :] - 0.4)
            & (px_per_window[None, :] > 3.0)
        )
        img = colors[seg][None, :, :] * (1 + 0.06 * rng.standard_normal((h, w, 1)))
        img = img * (1 - 0.25 * (up < 1.0))[..., None]  # darker shop fronts
        glass = np.array([0.12, 0.15, 0.2]) + 0.15 * rng.uniform(size=(1, w, 1)) * (up / 9.0)[..., None]
        img = np.where(windows[..., None], glass, img)
        full = _Box(slice(0, h), slice(0, w), yy, xx[None, :])
        _paint(canvas, full, mask, img.astype(np.float32), BUILDING, 0.0)
        canvas.depth[mask] = np.broadcast_to(depth[None, :], (h, w))[mask]
        canvas.lights |= mask & windows


def _draw_tree(canvas: Canvas, rng: np.random.Generator, st: _Street, x: float, depth: float) -> None:
    s = st.scale_at(depth)
    row, col = st.project(x, depth)
    trunk_h, crown = rng.uniform(1.0, 1.8), rng.uniform(0.7, 1.5)
    cy = row - (trunk_h + 0.7 * crown) * s
    box = _box(canvas, cy - 1.3 * crown * s, row + 1, col - 1.3 * crown * s, col + 1.3 * crown * s)
    if box is None:
        return
    trunk = _rect(box, col - 0.07 * s, col + 0.07 * s, row - (trunk_h + 0.2) * s, row)
    _paint(canvas, box, trunk, np.array([0.3, 0.22, 0.15]) * rng.uniform(0.7, 1.2), VEGETATION, depth)
    angle = np.arctan2(box.yy - cy, box.xx - col)
    phases = rng.uniform(0, 2 * np.pi, 3)
    wobble = 1 + 0.12 * (np.sin(3 * angle + phases[0]) + np.sin(5 * angle + phases[1]) + np.sin(8 * angle + phases[2]))
    dist = np.hypot((box.yy - cy) / 0.85, box.xx - col)
    leaves = dist <= crown * s * wobble
    green = np.array([0.18, 0.36, 0.12]) * rng.uniform(0.7, 1.3) + np.array([0.08, 0.06, 0.0]) * rng.uniform()
    texture = green * (1 + 0.35 * rng.standard_normal((*leaves.shape, 1)))
    texture *= (1 - 0.3 * np.clip((box.yy - cy) / max(crown * s, 1), 0, 1))[..., None]
    _paint(canvas, box, leaves, texture.astype(np.float32), VEGETATION, depth)


def _draw_pole(canvas: Canvas, rng: np.random.Generator, st: _Street, x: float, depth: float) -> None:
    s = st.scale_at(depth)
    row, col = st.project(x, depth)
    height = rng.uniform(2.5, 4.5)
    top = row - height * s
    toward_road = -np.sign(x) * rng.uniform(0.4, 0.9) * s
    box = _box(canvas, top - 0.1 * s - 1, row + 1, min(col, col + toward_road) - 2, max(col, col + toward_road) + 2)
    if box is None:
        return
    color = np.array(rng.choice([[0.45, 0.45, 0.47], [0.2, 0.28, 0.22], [0.6, 0.6, 0.62]])) * rng.uniform(0.8, 1.1)
    shaft = _rect(box, col - 0.04 * s, col + 0.04 * s, top, row)
    arm = _rect(box, min(col, col + toward_road), max(col, col + toward_road), top, top + 0.06 * s)
    _paint(canvas, box, shaft | arm, color, POLE, depth)
    canvas.lamps.append((top + 0.1 * s, col + toward_road, 0.15 * s))
    if rng.uniform() < 0.7:
        _draw_sign(canvas, rng, col, row - rng.uniform(1.8, 2.4) * s, s, depth)


def _draw_sign(canvas: Canvas, rng: np.random.Generator, col: float, cy: float, s: float, depth: float) -> None:
    r = rng.uniform(0.2, 0.32) * s
    box = _box(canvas, cy - r - 1, cy + r + 1, col - r - 1, col + r + 1)
    if box is None:
        return
    kind = rng.integers(0, 3)
    if kind == 0:  # round: red rim, white face
        outer = _ellipse(box, cy, col, r, r)
        inner = _ellipse(box, cy, col, 0.7 * r, 0.7 * r)
        img = np.where(inner[..., None], np.array([0.92, 0.92, 0.9]), np.array([0.8, 0.1, 0.1]))
    elif kind == 1:  # square: blue with a white arrow-ish bar
        outer = _rect(box, col - r, col + r, cy - r, cy + r)
        bar = _rect(box, col - 0.15 * r, col + 0.15 * r, cy - 0.6 * r, cy + 0.6 * r)
        img = np.where(bar[..., None], np.array([0.95, 0.95, 0.95]), np.array([0.1, 0.25, 0.7]))
    else:  # diamond: yellow with a dark border
        d = np.abs(box.yy - cy) + np.abs(box.xx - col)
        outer = d <= max(r * 1.2, 1.0)
        img = np.where((d <= r)[..., None], np.array([0.95, 0.8, 0.1]), np.array([0.1, 0.1, 0.1]))
    _paint(canvas, box, outer, img.astype(np.float32), SIGN, depth)


def _draw_car(canvas: Canvas, rng: np.random.Generator, st: _Street, x: float, depth: float) -> None:
    s = st.scale_at(depth)
    row, col = st.project(x, depth)
    width = rng.uniform(1.05, 1.3) * s
    van = rng.uniform() < 0.2
    roof = (rng.uniform(1.2, 1.45) if van else rng.uniform(0.85, 1.05)) * s
    box = _box(canvas, row - roof - 1, row + 1, col - width / 2 - 1, col + width / 2 + 1)
    if box is None:
        return
    paint = _hsv_color(rng, (0.0, 0.9), (0.15, 0.9))
    if rng.uniform() < 0.4:  # many cars are white, grey or black
        paint = np.full(3, rng.choice([0.08, 0.4, 0.6, 0.88]), np.float32)
    body = _rect(box, col - width / 2, col + width / 2, row - 0.62 * s, row - 0.12 * s)
    cab_w = width * (0.95 if van else 0.78)
    cabin = _rect(box, col - cab_w / 2, col + cab_w / 2, row - roof, row - 0.6 * s)
    wheels = _rect(box, col - 0.48 * width, col - 0.3 * width, row - 0.28 * s, row) | _rect(
        box, col + 0.3 * width, col + 0.48 * width, row - 0.28 * s, row
    )
    glass = _rect(box, col - 0.44 * cab_w, col + 0.44 * cab_w, row - roof + 0.08 * s, row - 0.64 * s)
    img = _shade(np.broadcast_to(paint, box.yy.shape[:1] + box.xx.shape[1:] + (3,)), box, row - roof, row, 0.35)
    img = np.where(glass[..., None], np.array([0.1, 0.12, 0.16]) + 0.1 * rng.uniform(), img)
    img = np.where(wheels[..., None], np.array([0.05, 0.05, 0.05]), img)
    lamps = _rect(box, col - 0.47 * width, col - 0.33 * width, row - 0.52 * s, row - 0.42 * s) | _rect(
        box, col + 0.33 * width, col + 0.47 * width, row - 0.52 * s, row - 0.42 * s
    )
    img = np.where(lamps[..., None], np.array([0.7, 0.08, 0.05]), img)
    mask = body | cabin | wheels
    _paint(canvas, box, mask, img.astype(np.float32), CAR, depth)
    canvas.lights[box.ys, box.xs] |= lamps & mask


def _draw_person(canvas: Canvas, rng: np.random.Generator, st: _Street, x: float, depth: float) -> None:
    s = st.scale_at(depth) * rng.uniform(1.0, 1.25)
    row, col = st.project(x, depth)
    half = 0.17 * s
    box = _box(canvas, row - s - 1, row + 1, col - half - 2, col + half + 2)
    if box is None:
        return
    skin = np.array([0.85, 0.65, 0.5]) * rng.uniform(0.4, 1.1)
    shirt = _hsv_color(rng, (0.0, 0.9), (0.15, 0.9))
    trousers = _hsv_color(rng, (0.0, 0.5), (0.08, 0.5))
    gap = 0.03 * s if s > 25 else 0.0
    legs = _rect(box, col - 0.12 * s, col - gap, row - 0.48 * s, row) | _rect(
        box, col + gap, col + 0.12 * s, row - 0.48 * s, row
    )
    torso = _rect(box, col - 0.15 * s, col + 0.15 * s, row - 0.82 * s, row - 0.45 * s)
    arms = _rect(box, col - half, col - 0.13 * s, row - 0.8 * s, row - 0.5 * s) | _rect(
        box, col + 0.13 * s, col + half, row - 0.8 * s, row - 0.5 * s
    )
    head = _ellipse(box, row - 0.9 * s, col, 0.09 * s, 0.075 * s)
    img = np.zeros(box.yy.shape[:1] + box.xx.shape[1:] + (3,), np.float32)
    img[:] = shirt
    img[legs] = trousers
    img[head] = skin
    _paint(canvas, box, legs | torso | arms | head, img, PERSON, depth)


def _place_objects(canvas: Canvas, rng: np.random.Generator, st: _Street, layout: Layout) -> None:
    """Sample every object's kind, X and depth, then draw far to near so near ones occlude."""
    kerb = st.road + st.walk
    items: list[tuple[float, float, Callable[..., None]]] = []
    for _ in range(rng.integers(layout.trees[0], layout.trees[1] + 1)):
        x = kerb + (rng.uniform(0.2, st.verge) if st.verge > 0.3 else -0.25)
        items.append((rng.choice([-1, 1]) * x, rng.uniform(1.5, 14), _draw_tree))
    for _ in range(rng.integers(layout.poles[0], layout.poles[1] + 1)):
        items.append((rng.choice([-1, 1]) * (st.road + 0.3), rng.uniform(1.3, 16), _draw_pole))
    for _ in range(rng.integers(layout.cars[0], layout.cars[1] + 1)):
        parked = rng.uniform() < 0.4
        lane = rng.choice([-1, 1]) * (st.road - 0.6) if parked else rng.uniform(-st.road + 0.6, st.road - 0.6)
        items.append((lane, rng.uniform(*layout.car_depth), _draw_car))
    for _ in range(rng.integers(layout.persons[0], layout.persons[1] + 1)):
        crossing = rng.uniform() < 0.15
        x = rng.uniform(-st.road, st.road) if crossing else rng.choice([-1, 1]) * (st.road + rng.uniform(0.2, st.walk))
        items.append((x, rng.uniform(1.05, 10), _draw_person))
    for x, depth, draw in sorted(items, key=lambda item: -item[1]):
        draw(canvas, rng, st, st.centre + x, depth)


def render_clean(rng: np.random.Generator, size: tuple[int, int], layout: Layout) -> Canvas:
    """A clear-day scene: the source domain, and the input of every weather style."""
    h, w = size
    canvas = Canvas(
        image=np.zeros((h, w, 3), np.float32),
        label=np.full((h, w), SKY, np.uint8),
        depth=np.full((h, w), _FAR, np.float32),
        lateral=np.full((h, w), np.inf, np.float32),
        horizon=0.0,
        lights=np.zeros((h, w), bool),
    )
    st = _sample_street(rng, h, w, layout)
    canvas.horizon = st.horizon
    _draw_sky(canvas, rng, st)
    _draw_ground(canvas, rng, st)
    _draw_far_band(canvas, rng, st)
    _draw_facades(canvas, rng, st, layout)
    _place_objects(canvas, rng, st, layout)
    gain = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3)  # exposure and white balance
    canvas.image = canvas.image * gain + rng.normal(0, 0.01, canvas.image.shape)
    return canvas


# ----------------------------------------------------------------------------- styles


def _glow(h: int, w: int, points: list[tuple[float, float, float]], spread: float) -> np.ndarray:
    """Sum of Gaussian halos around light sources (radius in px times ``spread``)."""
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    out = np.zeros((h, w), np.float32)
    for cy, cx, r in points:
        sigma = max(r * spread, 1.5)
        out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return out


def _blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """A 3x3 box blur, repeated: enough to soften without SciPy."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
        img = sum(p[dy : dy + img.shape[0], dx : dx + img.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    return img


def _fog(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Koschmieder's law: light decays with depth toward a bright grey airlight."""
    density = rng.uniform(0.3, 0.55)
    transmission = np.exp(-density * (c.depth - 0.4))[..., None] * rng.uniform(0.75, 0.9)
    air = rng.uniform(0.68, 0.82) + np.array([0.0, 0.01, 0.03])
    img = _blur(c.image, 1) * transmission + air * (1 - transmission)
    return img + 0.03 * _smooth_noise(rng, *c.label.shape, 12)[..., None]


def _night(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dark and blue, lit by lamps, lit windows and tail lights; noisy like a high-ISO sensor."""
    h, w = c.label.shape
    img = np.clip(c.image, 0, 1) ** 1.6 * rng.uniform(0.08, 0.14) * np.array([0.6, 0.7, 1.0])
    sky = c.label == SKY
    dusk = np.clip((np.arange(h, dtype=np.float32)[:, None] - c.horizon + 15) / 15, 0, 1)
    glow_sky = np.array([0.02, 0.025, 0.06]) + 0.05 * np.broadcast_to(dusk, (h, w))[..., None] * np.array(
        [1.0, 0.6, 0.3]
    )
    img[sky] = glow_sky[sky]
    lamps = [lamp for lamp in c.lamps if rng.uniform() < 0.85]
    light = _glow(h, w, lamps, 6.0)
    lamp_color = np.array([0.85, 0.85, 1.0])  # LED street lights
    img = img + np.clip(c.image, 0, 1) * light[..., None] * lamp_color * 0.7
    img = img + 0.4 * _glow(h, w, lamps, 1.0)[..., None] * lamp_color
    lit = c.lights & (rng.uniform(size=(h, w)) < 0.5) | (c.lights & (c.label == CAR))
    img[lit] = np.where((c.label[lit] == CAR)[:, None], np.array([1.0, 0.15, 0.1]), np.array([0.95, 0.8, 0.45]))
    img = img + 0.25 * _blur(lit[..., None].astype(np.float32) * np.array([1.0, 0.6, 0.3]), 2)
    return img + rng.normal(0, 0.03, img.shape)


def _rain(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Overcast, desaturated, streaked by drops; wet ground turns dark and mirrors the sky."""
    h, w = c.label.shape
    grey = c.image.mean(-1, keepdims=True)
    img = (0.45 * c.image + 0.55 * grey) * rng.uniform(0.55, 0.7) * np.array([0.92, 0.97, 1.06])
    img[c.label == SKY] = rng.uniform(0.5, 0.62) + 0.04 * _smooth_noise(rng, h, w, 10)[c.label == SKY][:, None]
    ground = np.isin(c.label, (ROAD, SIDEWALK))
    sheen = np.clip(_smooth_noise(rng, h, w, 5) - 0.3, 0, 1)[..., None]
    wet = img * 0.65 * (1 - sheen) + 0.45 * sheen
    img = np.where(ground[..., None], wet, img)
    streaks = np.zeros((h, w), np.float32)
    n, length = int(h * w / 40), rng.uniform(6, 14)
    y0, x0 = rng.uniform(-length, h, n), rng.uniform(0, w, n)
    slope = rng.uniform(-0.35, -0.1)
    for t in np.linspace(0, 1, int(length)):
        ys, xs = (y0 + t * length).astype(int), (x0 + slope * t * length).astype(int)
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        np.add.at(streaks, (ys[ok], xs[ok]), 1.0)
    return img + 0.22 * np.clip(streaks, 0, 1)[..., None] + rng.normal(0, 0.015, img.shape)


def _snow(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Snow on the ground and on tops, grey-white sky, falling flakes: road and sidewalk look alike."""
    h, w = c.label.shape
    img = 0.6 * c.image + 0.3 * c.image.mean(-1, keepdims=True)
    cover = np.clip(0.8 + 0.25 * _smooth_noise(rng, h, w, 5), 0, 1)
    lateral = np.where(np.isfinite(c.lateral), np.abs(c.lateral), 0.0)
    tracks = np.abs(_frac(lateral / rng.uniform(0.8, 1.2)) - 0.5) < 0.12
    cover = np.where((c.label == ROAD) & tracks, cover * 0.35, cover)
    ground = np.isin(c.label, (ROAD, SIDEWALK)) | ((c.label == VEGETATION) & np.isfinite(c.lateral))
    white = np.array([0.88, 0.9, 0.95]) * (1 + 0.04 * rng.standard_normal((h, w, 1)))
    img = np.where(ground[..., None], img * (1 - cover[..., None]) + white * cover[..., None], img)
    above = np.roll(c.label, 1, axis=0) != c.label  # fresh snow on the top edge of everything
    tops = above & np.isin(c.label, (BUILDING, VEGETATION, CAR)) & (rng.uniform(size=(h, w)) < 0.8)
    img[tops] = 0.9
    img[c.label == SKY] = rng.uniform(0.72, 0.85) + 0.03 * rng.standard_normal(((c.label == SKY).sum(), 1))
    img = img * rng.uniform(1.0, 1.15)
    flakes = rng.uniform(size=(h, w)) < 0.025
    flakes |= np.roll(flakes, 1, axis=1) & (rng.uniform(size=(h, w)) < 0.5)
    img[flakes] = 0.95
    return img


def _tint(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """A strong sodium-lamp / old-sensor colour cast with lifted blacks and lower contrast."""
    mix = np.array([[0.85, 0.35, 0.05], [0.25, 0.65, 0.1], [0.05, 0.2, 0.35]]) * rng.uniform(0.95, 1.05, (3, 1))
    img = np.clip(c.image, 0, 1) @ mix.T
    return 0.12 + 0.8 * img**0.8 + np.array([0.06, 0.02, 0.0])


def _noise(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """A cheap, underexposed sensor: shot and read noise, chroma blotches, hot pixels."""
    h, w = c.label.shape
    img = np.clip(c.image, 0, 1) * rng.uniform(0.6, 0.8)
    shot = rng.standard_normal(img.shape) * np.sqrt(img * 0.015 + 1e-6)
    read = rng.normal(0, 0.09, img.shape)
    chroma = 0.06 * np.stack([_smooth_noise(rng, h, w, 3) for _ in range(3)], -1)
    rows = 0.03 * rng.standard_normal((h, 1, 1))
    img = img + shot + read + chroma + rows
    hot = rng.uniform(size=(h, w)) < 0.01
    img[hot] = rng.uniform(0, 1, (int(hot.sum()), 1))
    return img


_APPEARANCE: dict[str, Callable[[Canvas, np.random.Generator], np.ndarray]] = {
    "source": lambda c, rng: c.image,
    "fog": _fog,
    "night": _night,
    "rain": _rain,
    "snow": _snow,
    "tint": _tint,
    "noise": _noise,
}
assert tuple(_APPEARANCE) == SYNTHETIC_STYLES


def render(
    style: str, index: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``style``: (uint8 HxWx3 RGB, uint8 HxW class ids). Pure in its arguments."""
    if style not in _APPEARANCE:
        raise ValueError(f"unknown synthetic style {style!r}; choose one of {', '.join(SYNTHETIC_STYLES)}")
    layout_name = _STYLE_LAYOUT.get(style, "default")
    layout_id = list(LAYOUTS).index(layout_name)
    scene_rng = np.random.default_rng([seed, index, layout_id])
    canvas = render_clean(scene_rng, size, LAYOUTS[layout_name])
    look_rng = np.random.default_rng([seed, index, 1000 + SYNTHETIC_STYLES.index(style)])
    image = _APPEARANCE[style](canvas, look_rng)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), canvas.label


class SyntheticDataset(Dataset):
    """Synthetic images of one or more styles, rendered on first access and then kept.

    Items are (float32 [3,H,W] in [0,1], int64 [H,W]); ``index_lists`` gives, per style,
    which image indices to show (a time split or cap selects them).
    """

    def __init__(self, index_lists: dict[str, list[int]], seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE):
        self.items = [(style, i) for style, indices in index_lists.items() for i in indices]
        self.seed, self.size = seed, size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if idx not in self._cache:
            style, i = self.items[idx]
            self._cache[idx] = render(style, i, self.seed, self.size)
        image, label = self._cache[idx]
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), torch.from_numpy(label).long()

    def domain_of(self, idx: int) -> str:
        return self.items[idx][0]

    def image_key(self, idx: int) -> str:
        """Style, index and seed name the image; the size is left out, so a corruption seeded from this
        key draws the same randomness for one image at any size."""
        style, i = self.items[idx]
        return f"synthetic/{style}/{i}/seed={self.seed}"


README_TEXT = """Synthetic street scenes written by `fedmerge data synth` (seed {seed}, {n} images per style, {h}x{w}).

Layout (the generic folder layout, one folder per domain):
  classes.txt               class names, one a line; label value = line index
  <style>/images/NNNN.png   RGB image
  <style>/labels/NNNN.png   one-channel class ids, same file name

Styles: {styles}. "source" is the clean labeled domain; the others shift appearance
(weather, light, sensor); "rain" also shifts layout (lower horizon, more cars).
Image NNNN of every style except rain shows the same scene as source image NNNN.

Read it back with the data spec  folder:{out}?domain=<style>
or regenerate it in memory with  synthetic?domain=<style>&n={n}&seed={seed}&size={h}x{w}
"""


def write_synthetic_folder(
    out: str | Path, styles: Sequence[str], num_images: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE
) -> list[Path]:
    """Write styles in the generic folder layout; returns the per-style directories."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    text = README_TEXT.format(seed=seed, n=num_images, h=size[0], w=size[1], styles=", ".join(styles), out=out)
    (out / "README.txt").write_text(text)
    dirs = []
    for style in styles:
        (out / style / "images").mkdir(parents=True, exist_ok=True)
        (out / style / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(num_images):
            image, label = render(style, i, seed, size)
            Image.fromarray(image).save(out / style / "images" / f"{i:04d}.png")
            Image.fromarray(label).save(out / style / "labels" / f"{i:04d}.png")
        dirs.append(out / style)
    return dirs
