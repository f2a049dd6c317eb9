"""A deterministic synthetic dataset of small objects on cluttered backgrounds.

Each image holds one object whose class is a (shape, texture, colour) combination, placed at a
random position and size (side 15–40 % of the image side, small rotation) on a smooth multi-scale
colour-noise background strewn with distractor strokes and blobs that are always clearly smaller
than any object. The class identity lives only in the object, so a classifier's class-activation
map has to localise it, and a tight box around the object covers a small part of the image: the
setting in which CIM's exemplar compression pays off.

Two class tables (``SyntheticSpec.colour``): ``"class"`` (the default) makes the colour part of the
class; ``"random"`` makes the class a (shape, texture) pair and paints every object in a palette
colour drawn per image. Under ``"random"`` nothing coarse identifies a class — its shape and its
fine texture (stripes, checks, dots a few pixels wide) do — so an image downsampled as a whole loses
its class, and only a box around the object keeps it: the setting in which *where* the box goes
matters, not just how many exemplars the budget buys.

Everything is generated locally from the spec. Determinism: every random draw comes from a
``numpy.random.Generator`` (PCG64) seeded from ``(seed, split, class)``, and rendering uses only
correctly rounded IEEE operations (``+ - * /``, comparisons, ``floor``, ``mod``; no BLAS, no
vectorised transcendental functions, whose SIMD implementations differ between CPUs), so the same
spec gives byte-identical arrays on every machine. Each (split, class) has its own stream and each
image consumes its draws in a fixed order, so the first ``n`` images of a class do not depend on
``num_classes``, ``train_per_class`` or ``test_per_class``.

Arrays are ordered class-major (all images of class 0, then class 1, ...); images are uint8
``[N, H, W, 3]`` as PyCIL stores them, labels int64, and ``*_boxes`` the object's square as int64
``(y0, y1, x0, x1)``, half-open, in pixels. The shape is drawn inside that square (clipped to it).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import time
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_open

logger = logging.getLogger(__name__)

#: Bump whenever the rendered pixels, the class enumeration or the cache layout change: it is part
#: of :meth:`SyntheticSpec.cache_key`, so stale caches are never read.
FORMAT_VERSION = 1

SHAPES: tuple[str, ...] = (
    "disc", "square", "triangle", "cross", "ring", "diamond", "star", "hexagon",
)
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted")
#: Saturated, well-separated colours (RGB). The background is kept desaturated so they stand out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 185, 50),
    "blue": (40, 75, 235),
    "yellow": (240, 215, 30),
    "magenta": (215, 40, 205),
    "cyan": (30, 210, 220),
}
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 256
MAX_PER_CLASS = 100_000
#: Object side as a fraction of the image side, sampled uniformly (in whole pixels) in this range.
OBJECT_SIDE_RANGE = (0.15, 0.40)
#: Largest distractor extent (blob diameter, stroke length) as a fraction of the image side:
#: about half the smallest object side, so the class is never carried by clutter.
DISTRACTOR_MAX_EXTENT = 0.08
#: Rotation of the object: tan(angle / 2) is drawn uniformly in [-T, T] (about +-15 degrees).
#: Small enough that a square never becomes a diamond.
_HALF_ANGLE_TAN = 0.13
_SPLIT_IDS = {"train": 0, "test": 1}
#: ``SyntheticSpec.colour`` values: the colour is part of the class, or drawn per image.
COLOUR_MODES: tuple[str, ...] = ("class", "random")


# ----------------------------------------------------------------------------------------------
# Class enumeration


def max_classes(colour: str = "class") -> int:
    """Number of distinct classes: (shape, texture, colour) triples, or (shape, texture) pairs when
    ``colour`` is ``"random"``."""
    _check_colour(colour)
    return len(SHAPES) * len(TEXTURES) * (len(_COLOUR_NAMES) if colour == "class" else 1)


def _check_colour(colour: str) -> None:
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour={colour!r} is not one of {', '.join(map(repr, COLOUR_MODES))}")


@functools.lru_cache(maxsize=len(COLOUR_MODES))
def _class_table(colour: str = "class") -> np.ndarray:
    """``[max_classes(colour), 3]`` (shape, texture, colour) indices in class order; the colour
    index is -1 (drawn per image) when ``colour`` is ``"random"``.

    Greedy max-min ordering over all combinations: each next class maximises its smallest number
    of differing attributes to the classes before it (ties: largest total difference, then the
    lowest combination index). The first classes differ in every attribute and any prefix is as
    spread out as the greedy order allows, so a 4–10 class subset is learnable.
    Integer arithmetic only: identical everywhere.
    """
    _check_colour(colour)
    ns, nt = len(SHAPES), len(TEXTURES)
    nc = len(_COLOUR_NAMES) if colour == "class" else 1
    combos = np.stack(np.meshgrid(np.arange(ns), np.arange(nt), np.arange(nc), indexing="ij"),
                      axis=-1).reshape(-1, 3)
    n = len(combos)
    chosen = np.zeros(n, dtype=bool)
    min_d = np.full(n, 4, dtype=np.int64)
    sum_d = np.zeros(n, dtype=np.int64)
    order = []
    for _ in range(n):
        # Lexicographic (min_d, sum_d) maximum; argmax returns the first, i.e. lowest index.
        score = np.where(chosen, -1, min_d * (4 * n) + sum_d)
        k = int(np.argmax(score))
        order.append(k)
        chosen[k] = True
        d = (combos != combos[k]).sum(axis=1)
        min_d = np.minimum(min_d, d)
        sum_d += d
    table = combos[np.array(order)]
    if colour == "random":
        table[:, 2] = -1
    return table


def class_attributes(k: int, colour: str = "class") -> tuple[str, str, str | None]:
    """``(shape, texture, colour)`` names of class ``k`` (fixed for every spec); the colour is
    None when ``colour`` is ``"random"`` (each image draws its own)."""
    if not 0 <= k < max_classes(colour):
        raise ValueError(f"class index {k} out of range [0, {max_classes(colour)})")
    s, t, c = _class_table(colour)[k]
    return SHAPES[s], TEXTURES[t], (_COLOUR_NAMES[c] if c >= 0 else None)


def class_name(k: int, colour: str = "class") -> str:
    """E.g. ``"red-striped-disc"``, or ``"striped-disc"`` when ``colour`` is ``"random"``."""
    shape, texture, name = class_attributes(k, colour)
    return f"{texture}-{shape}" if name is None else f"{name}-{texture}-{shape}"


# ----------------------------------------------------------------------------------------------
# Spec and result


def _check_int(field: str, value: object, lo: int, hi: int | None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{field}={value} is out of range: allowed {allowed}{hint}")


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset (and its cache file)."""

    num_classes: int = 10
    image_size: int = 96
    train_per_class: int = 60
    test_per_class: int = 20
    seed: int = 0
    #: ``"class"``: the colour is part of the class; ``"random"``: drawn per image (see the module).
    colour: str = "class"

    def validate(self) -> None:
        """Raise ValueError naming the offending field, its value and the allowed range."""
        _check_colour(self.colour)
        colours = (f" x {len(_COLOUR_NAMES)} colours" if self.colour == "class"
                   else ", colours drawn per image")
        _check_int("num_classes", self.num_classes, 1, max_classes(self.colour),
                   f" (the maximum is {max_classes(self.colour)} = {len(SHAPES)} shapes x "
                   f"{len(TEXTURES)} textures{colours})")
        _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        _check_int("train_per_class", self.train_per_class, 1, MAX_PER_CLASS)
        _check_int("test_per_class", self.test_per_class, 1, MAX_PER_CLASS)
        _check_int("seed", self.seed, 0, 2**63 - 1)

    def cache_key(self) -> str:
        """Stable file-name-safe key; includes :data:`FORMAT_VERSION`."""
        self.validate()
        mode = "" if self.colour == "class" else f"-{self.colour}colour"
        return (f"synthetic-v{FORMAT_VERSION}{mode}-c{int(self.num_classes)}-px{int(self.image_size)}"
                f"-tr{int(self.train_per_class)}-te{int(self.test_per_class)}"
                f"-seed{int(self.seed)}")


@dataclass
class SyntheticData:
    train_x: np.ndarray  # uint8 [N, H, W, 3]
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray
    train_boxes: np.ndarray  # int64 [N, 4] (y0, y1, x0, x1), half-open
    test_boxes: np.ndarray
    class_names: list[str]


# ----------------------------------------------------------------------------------------------
# Rendering helpers (correctly rounded operations only; see the module docstring)


@functools.lru_cache(maxsize=64)
def _linear_taps(grid: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of align_corners=False linear upsampling from ``grid`` to ``size``."""
    p = (np.arange(size, dtype=np.float64) + 0.5) * (grid / size) - 0.5
    p = np.clip(p, 0.0, grid - 1)
    i0 = np.floor(p).astype(np.intp)
    i1 = np.minimum(i0 + 1, grid - 1)
    return i0, i1, p - i0


def _upsample(g: np.ndarray, size: int) -> np.ndarray:
    """Separable bilinear upsampling of ``[gh, gw, C]`` to ``[size, size, C]`` (gathers, no BLAS)."""
    y0, y1, wy = _linear_taps(g.shape[0], size)
    x0, x1, wx = _linear_taps(g.shape[1], size)
    wx = wx[None, :, None]
    rows = g[:, x0] * (1.0 - wx) + g[:, x1] * wx  # [gh, size, C]
    wy = wy[:, None, None]
    return rows[y0] * (1.0 - wy) + rows[y1] * wy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multi-scale colour noise around a desaturated base colour, float64 [S, S, 3].

    Octaves of 2, 4, 8 and 16 cells are summed on the 16-cell grid, which is then upsampled once.
    """
    grey = rng.uniform(85.0, 165.0)
    tint = rng.uniform(-18.0, 18.0, size=3)
    fine = 16
    noise = np.zeros((fine, fine, 3))
    for grid, amp in ((2, 30.0), (4, 22.0), (8, 14.0), (fine, 8.0)):
        octave = rng.uniform(-1.0, 1.0, size=(grid, grid, 3))
        noise += amp * (_upsample(octave, fine) if grid < fine else octave)
    # Mostly luminance variation plus a little independent colour, so the background stays muted.
    # (explicit sum, not .mean(): a fixed summation order whatever SIMD path numpy takes)
    lum = (noise[..., 0:1] + noise[..., 1:2] + noise[..., 2:3]) / 3.0
    noise = grey + tint + lum + 0.35 * (noise - lum)
    return _upsample(noise, size)


def _random_vivid(rng: np.random.Generator) -> np.ndarray:
    """Half of the time a class colour (so colour alone cannot localise), else a random one."""
    if rng.random() < 0.5:
        rgb = _COLOUR_RGB[rng.integers(len(_COLOUR_RGB))].copy()
    else:
        rgb = rng.uniform(0.0, 255.0, size=3)
    return rgb * rng.uniform(0.75, 1.0)


def _draw_distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Strokes (capsules) and blobs (discs), each at most DISTRACTOR_MAX_EXTENT of the side."""
    size = img.shape[0]
    max_ext = DISTRACTOR_MAX_EXTENT * size
    count = int(rng.integers(6, 13))
    for _ in range(count):
        kind = rng.random()
        colour = _random_vivid(rng)
        cy, cx = rng.uniform(0.0, size, size=2)
        if kind < 0.5:  # stroke: segment of length L, half-width r (total extent L + 2r <= max)
            r = rng.uniform(0.5, max(0.6, 0.012 * size))
            length = rng.uniform(0.4, 1.0) * (max_ext - 2 * r)
            t = rng.uniform(-1.0, 1.0)  # direction via tan(angle/2): (1-t^2, 2t)/(1+t^2)
            flip = 1.0 if rng.random() < 0.5 else -1.0
            dx = (1.0 - t * t) / (1.0 + t * t) * flip
            dy = 2.0 * t / (1.0 + t * t)
            hx, hy = 0.5 * length * dx, 0.5 * length * dy
            ext = 0.5 * length + r
        else:  # blob: disc of radius r
            r = rng.uniform(0.2, 0.5) * max_ext
            hx = hy = 0.0
            ext = r
        ya, yb = max(0, int(cy - ext)), min(size, int(cy + ext) + 2)
        xa, xb = max(0, int(cx - ext)), min(size, int(cx + ext) + 2)
        if ya >= yb or xa >= xb:
            continue
        py = np.arange(ya, yb, dtype=np.float64)[:, None] + 0.5 - cy
        px = np.arange(xa, xb, dtype=np.float64)[None, :] + 0.5 - cx
        seg2 = hx * hx + hy * hy
        if seg2 > 0.0:  # squared distance to the segment from -h to +h
            s = np.clip((px * hx + py * hy) / seg2, -1.0, 1.0)
            ex, ey = px - s * hx, py - s * hy
        else:
            ex, ey = px, py
        mask = ex * ex + ey * ey <= r * r
        img[ya:yb, xa:xb][mask] = colour


_SQRT3 = 1.7320508075688772


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape in object coordinates u (right), v (down) in [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 0.92**2
    if shape == "square":
        return np.maximum(au, av) <= 0.76
    if shape == "triangle":  # apex up at v = -h, base at v = +h of half-width w
        h, w = 0.85, 0.98
        return (v <= h) & (au <= w * (v + h) / (2 * h))
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.92)) | ((av <= 0.3) & (au <= 0.92))
    if shape == "ring":
        return (r2 <= 0.95**2) & (r2 >= 0.52**2)
    if shape == "diamond":
        return au + av <= 0.98
    if shape == "star":  # hexagram: an up and a down triangle of circumradius R
        big = 0.98
        up = (v <= big / 2) & (_SQRT3 * au - v <= big)
        down = (v >= -big / 2) & (_SQRT3 * au + v <= big)
        return up | down
    if shape == "hexagon":  # pointy-top regular hexagon of circumradius a
        a = 0.95
        return (au <= a * _SQRT3 / 2) & (au / _SQRT3 + av <= a)
    raise AssertionError(shape)  # unreachable: shapes come from SHAPES


def _texture_on(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the texture shows the full colour (elsewhere the darker shade)."""
    if texture == "solid":
        return np.ones(u.shape, dtype=bool)
    if texture == "striped":  # 5 stripes across the object
        return np.floor((u + 1.0) * 2.5) % 2 == 0
    if texture == "checkered":  # 4 x 4 checks
        return (np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)) % 2 == 0
    if texture == "dotted":  # dark dots of radius 0.16 on a 0.5 grid
        du = (u + 1.0) % 0.5 - 0.25
        dv = (v + 1.0) % 0.5 - 0.25
        return du * du + dv * dv > 0.16**2
    raise AssertionError(texture)


def _draw_object(rng: np.random.Generator, img: np.ndarray, attrs: np.ndarray) -> np.ndarray:
    """Draw the class object; return its box (y0, y1, x0, x1)."""
    size = img.shape[0]
    lo = int(np.ceil(OBJECT_SIDE_RANGE[0] * size))
    hi = int(np.floor(OBJECT_SIDE_RANGE[1] * size))
    side = int(rng.integers(lo, hi + 1))
    y0 = int(rng.integers(0, size - side + 1))
    x0 = int(rng.integers(0, size - side + 1))
    t = rng.uniform(-_HALF_ANGLE_TAN, _HALF_ANGLE_TAN)
    cos, sin = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)
    jitter = rng.uniform(0.85, 1.0) * (1.0 + rng.uniform(-0.06, 0.06, size=3))
    dark = rng.uniform(0.25, 0.4)

    c = (np.arange(side, dtype=np.float64) + 0.5) * (2.0 / side) - 1.0
    gy, gx = c[:, None], c[None, :]
    u = cos * gx + sin * gy
    v = cos * gy - sin * gx
    shape, texture, colour = (int(a) for a in attrs)
    if colour < 0:  # drawn per image (colour mode "random"): after the other draws, so that the
        colour = int(rng.integers(len(_COLOUR_RGB)))  # "class" mode's streams are unchanged
    mask = _shape_mask(SHAPES[shape], u, v)
    rgb = _COLOUR_RGB[colour] * jitter
    on = _texture_on(TEXTURES[texture], u, v)
    patch = img[y0:y0 + side, x0:x0 + side]
    patch[mask & on] = rgb
    patch[mask & ~on] = rgb * dark
    return np.array([y0, y0 + side, x0, x0 + side], dtype=np.int64)


def _render_split(spec: SyntheticSpec, split: str, per_class: int):
    size = int(spec.image_size)
    table = _class_table(spec.colour)
    n = int(spec.num_classes) * per_class
    xs = np.empty((n, size, size, 3), dtype=np.uint8)
    ys = np.repeat(np.arange(int(spec.num_classes), dtype=np.int64), per_class)
    boxes = np.empty((n, 4), dtype=np.int64)
    i = 0
    for k in range(int(spec.num_classes)):
        seq = np.random.SeedSequence([int(spec.seed), _SPLIT_IDS[split], k, FORMAT_VERSION])
        rng = np.random.Generator(np.random.PCG64(seq))
        for _ in range(per_class):
            img = _background(rng, size)
            _draw_distractors(rng, img)
            boxes[i] = _draw_object(rng, img, table[k])
            xs[i] = np.clip(np.floor(img + 0.5), 0.0, 255.0).astype(np.uint8)
            i += 1
    return xs, ys, boxes


def generate(spec: SyntheticSpec) -> SyntheticData:
    """Render the dataset described by ``spec`` (no caching; see :func:`load_synthetic`)."""
    spec.validate()
    train_x, train_y, train_boxes = _render_split(spec, "train", int(spec.train_per_class))
    test_x, test_y, test_boxes = _render_split(spec, "test", int(spec.test_per_class))
    return SyntheticData(train_x, train_y, test_x, test_y, train_boxes, test_boxes,
                         [class_name(k, spec.colour) for k in range(int(spec.num_classes))])


# ----------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> pathlib.Path:
    """``$CIM_PLUGIN_CACHE`` if set, else ``~/.cache/cim-plugin``."""
    env = os.environ.get("CIM_PLUGIN_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "cim-plugin"


_ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y", "train_boxes", "test_boxes")
_CACHE_KEYS = frozenset(_ARRAY_KEYS + ("class_names", "cache_key"))
_LOAD_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _expected_layout(spec: SyntheticSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    s, c = int(spec.image_size), int(spec.num_classes)
    ntr, nte = c * int(spec.train_per_class), c * int(spec.test_per_class)
    u8, i64 = np.dtype(np.uint8), np.dtype(np.int64)
    return {
        "train_x": ((ntr, s, s, 3), u8), "train_y": ((ntr,), i64),
        "test_x": ((nte, s, s, 3), u8), "test_y": ((nte,), i64),
        "train_boxes": ((ntr, 4), i64), "test_boxes": ((nte, 4), i64),
    }


def _read_cache(path: pathlib.Path, spec: SyntheticSpec) -> SyntheticData:
    """Load and check a cache file; raise ValueError (or a load error) if it does not fit."""
    with np.load(path, allow_pickle=False) as z:
        if set(z.files) != _CACHE_KEYS:
            raise ValueError(f"keys {sorted(z.files)} != {sorted(_CACHE_KEYS)}")
        if str(z["cache_key"]) != spec.cache_key():
            raise ValueError(f"cache_key {str(z['cache_key'])!r} != {spec.cache_key()!r}")
        arrays = {k: np.array(z[k]) for k in _ARRAY_KEYS}
        names = [str(s) for s in z["class_names"]]
    for key, (shape, dtype) in _expected_layout(spec).items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise ValueError(f"{key}: {arrays[key].dtype}{list(arrays[key].shape)}, "
                             f"expected {dtype}{list(shape)}")
    expected_names = [class_name(k, spec.colour) for k in range(int(spec.num_classes))]
    if names != expected_names:
        raise ValueError("class_names do not match the spec")
    return SyntheticData(class_names=names, **arrays)


def _write_cache(path: pathlib.Path, spec: SyntheticSpec, data: SyntheticData) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **{k: getattr(data, k) for k in _ARRAY_KEYS},
                 class_names=np.array(data.class_names, dtype=str),
                 cache_key=np.array(spec.cache_key()))


def cache_path(spec: SyntheticSpec, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Where :func:`load_synthetic` keeps ``spec``'s arrays."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "synthetic" / f"{spec.cache_key()}.npz"


def load_synthetic(spec: SyntheticSpec,
                   cache_dir: pathlib.Path | None = None) -> SyntheticData:
    """Return the dataset, from ``<cache_dir>/synthetic/<cache_key>.npz`` when it is valid.

    A missing file is generated and written atomically; an unreadable or mismatching one is
    reported with a warning and regenerated.
    """
    spec.validate()
    path = cache_path(spec, cache_dir)
    if path.exists():
        try:
            data = _read_cache(path, spec)
            logger.debug("synthetic data: loaded %s", path)
            return data
        except _LOAD_ERRORS as exc:
            logger.warning("synthetic data: cache file %s is unreadable or does not match the "
                           "spec (%s: %s); regenerating it", path, type(exc).__name__, exc)
    n = int(spec.num_classes) * (int(spec.train_per_class) + int(spec.test_per_class))
    logger.info("synthetic data: generating %d images of %d px (%d classes) ...",
                n, int(spec.image_size), int(spec.num_classes))
    start = time.perf_counter()
    data = generate(spec)
    _write_cache(path, spec, data)
    logger.info("synthetic data: generated %d images in %.1f s, cached at %s",
                n, time.perf_counter() - start, path)
    return data
