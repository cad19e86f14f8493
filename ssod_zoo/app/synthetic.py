"""The synthetic benchmark: the project's own ID and OOD images, generated from a seed, no downloads.

SSOD (Sec. 2.3) learns its OOD head from the *background* of ID training images: the classifier is applied at
every feature-map position and positions where it is unsure of the true class become OOD examples. So the
benchmark is built like a natural photo collection, not like MNIST: every image is a cluttered scene, and the
object that gives the image its label covers a minority of it.

**ID** (``id/train``, ``id/val``): one object of one of K classes (:data:`ID_SHAPES`: star, ring, cross,
triangle, arrow, crescent, heart, bolt, letter glyphs, ...) at a random position, scale, rotation and aspect,
filled with a random texture in colours of the class's typical hue (as real categories have typical
colours: a class's hue band is +-HUE_SPREAD around its own point on the colour wheel; saturation and brightness
vary freely), covering :data:`OBJECT_AREA` (8-30%) of the image, over a cluttered background (gradients, smooth
noise, stripes, checkers, blotches, grain, in any colour) with distractors that are no class (thin strokes,
zigzags, curves, dots, small random blobs). Shape and hue together tell the classes apart. (Version 1 drew
object colours independently of the class; small CNNs trained from scratch on CPU stayed at chance for
hundreds of steps, too slow for a demo, so version 2 gives classes their hue.) With 96x96 images and an output-stride-16 backbone the
feature map has 6x6 cells: an object fills a few of them (typically 3-10) and leaves at least 10 without a
single object pixel.

**OOD sets** (``ood/<set>``), one per kind of OOD data in the paper's tables:

- ``near``: held-out object classes (:data:`NEAR_SHAPES`: frame, trefoil, half disc, letter H, droplet,
  gear) drawn by exactly the same pipeline as ID objects (same sizes, textures, saturation, brightness and
  backgrounds; any hue, so most of them share a hue band with some ID class).
  Several resemble ID classes (frame ~ ring, gear ~ star/ring, droplet and trefoil ~ heart). Stands for the
  hard, semantic-shift sets: ImageNet-O, OpenImage-O, SSB.
- ``textures``: backgrounds alone, from the very generator used for ID backgrounds, clutter included, no
  object. Stands for Textures (DTD), Places and SUN: scene and texture images without an ID object.
- ``domain``: another visual domain: line drawings / sketches (pen outlines of random figures, hatching and
  scribbles on tinted paper, no ID class). Paper and ink colours come from the same colour distribution as
  ID images, so mean colour and brightness do not give it away; it differs in structure (flat areas, thin
  strokes, no filled textured objects). Stands for far-OOD sets of another kind of image, as SVHN is for
  CIFAR-10, or sketch and clip-art collections for photos.

No set is tuned for any detector; the tests check that no single global colour statistic (mean brightness,
mean saturation) separates any OOD set from ID.

Every image comes from its own random generator seeded by ``(seed, split, index)``, so the benchmark does not
depend on generation order or worker count. :class:`SyntheticBenchmark` caches it on disk as ImageFolder trees
(which are also the export)::

    <root>/benchmark.json                   config + generator version
    <root>/id/train/<class>/<index>.png
    <root>/id/val/<class>/<index>.png
    <root>/ood/<set>/<set>/<index>.png      one dummy class directory, so ImageFolder reads it

Example::

    bench = SyntheticBenchmark('data/ssod_synth').prepare()
    train = bench.train_dataset(transform)          # torchvision ImageFolder, labels 0..K-1
    ood = bench.ood_datasets(transform)             # {'near': ..., 'textures': ..., 'domain': ...}
    image, mask, label = bench.render('train', 0)   # one sample with its object mask, no disk
"""
import colorsys
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from torchvision.datasets import ImageFolder

__all__ = [
    'BenchmarkConfig', 'SyntheticBenchmark', 'Sample', 'render',
    'ID_SHAPES', 'NEAR_SHAPES', 'OOD_SETS', 'OBJECT_AREA', 'GENERATOR_VERSION',
]

# Bump whenever rendering changes: caches made by another version are regenerated.
GENERATOR_VERSION = 2
HUE_SPREAD = 0.03  # half-width of an ID class's hue band (12 shapes: bands 1/12 apart)

# Fraction of the image an object covers (its mask), for ID and near-OOD objects alike.
OBJECT_AREA: Tuple[float, float] = (0.08, 0.30)

OOD_SETS: Tuple[str, ...] = ('near', 'textures', 'domain')
_SPLITS: Dict[str, int] = {'train': 0, 'val': 1, 'near': 2, 'textures': 3, 'domain': 4}

_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down, for anti-aliased edges
_PNG_COMPRESS = 1  # noisy 96x96 images barely compress; level 1 is ~3x faster than the default for ~5% more bytes

Polygons = List[Tuple[int, np.ndarray]]  # (+1 add / -1 cut out, (N, 2) vertices in unit coordinates)


# ----------------------------------------------------------------------------------------------- shapes

def _circle(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y - 2], 1) / 17


def _gear(teeth: int = 8) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 8 * teeth, endpoint=False)
    r = np.where((t * teeth / (2 * np.pi)) % 1 < 0.5, 1.0, 0.75)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


# Unit-coordinate drawings, roughly within [-1, 1]^2. Size is normalised by area when drawn, so only the form
# matters. Distinct under rotation and mirroring, since objects are rotated freely and training may flip.
_SHAPES: Dict[str, Callable[[], Polygons]] = {
    # ID classes, in the order they are taken (the first K are used)
    'star': lambda: [(1, _star(5, 0.45))],
    'ring': lambda: [(1, _circle(1.0)), (-1, _circle(0.55))],
    'cross': lambda: [(1, _poly(-0.3, -1, 0.3, -1, 0.3, -0.3, 1, -0.3, 1, 0.3, 0.3, 0.3, 0.3, 1, -0.3, 1,
                                -0.3, 0.3, -1, 0.3, -1, -0.3, -0.3, -0.3))],
    'triangle': lambda: [(1, _star(3, 0.5)[::2])],
    'arrow': lambda: [(1, _poly(-1, -0.22, 0.15, -0.22, 0.15, -0.6, 1, 0, 0.15, 0.6, 0.15, 0.22, -1, 0.22))],
    'crescent': lambda: [(1, _circle(1.0)), (-1, _circle(0.82, 0.42, -0.05))],
    'heart': lambda: [(1, _heart())],
    'bolt': lambda: [(1, _poly(-0.2, -1, 0.45, -1, 0.1, -0.2, 0.55, -0.2, -0.35, 1, -0.05, 0.15, -0.5, 0.15))],
    'letter_e': lambda: [(1, _poly(-0.7, -1, 0.7, -1, 0.7, -0.6, -0.25, -0.6, -0.25, -0.2, 0.5, -0.2, 0.5, 0.2,
                                   -0.25, 0.2, -0.25, 0.6, 0.7, 0.6, 0.7, 1, -0.7, 1))],
    'hourglass': lambda: [(1, _poly(-0.8, -1, 0.8, -1, 0.15, 0, 0.8, 1, -0.8, 1, -0.15, 0))],
    'chevron': lambda: [(1, _poly(-1, -0.5, 0, 0.3, 1, -0.5, 1, 0.1, 0, 0.9, -1, 0.1))],
    'letter_t': lambda: [(1, _poly(-0.9, -1, 0.9, -1, 0.9, -0.55, 0.22, -0.55, 0.22, 1, -0.22, 1, -0.22, -0.55,
                                   -0.9, -0.55))],
    # held out: near-OOD classes, never used for ID
    'frame': lambda: [(1, _poly(-0.85, -0.85, 0.85, -0.85, 0.85, 0.85, -0.85, 0.85)),
                      (-1, _poly(-0.45, -0.45, 0.45, -0.45, 0.45, 0.45, -0.45, 0.45))],
    'trefoil': lambda: [(1, _circle(0.35))] + [
        (1, _circle(0.48, 0.5 * np.cos(a), 0.5 * np.sin(a))) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3],
    'half_disc': lambda: [(1, np.concatenate([_circle(1.0, n=64)[:33], [[-1.0, 0.0]]]))],
    'letter_h': lambda: [(1, _poly(-0.8, -1, -0.35, -1, -0.35, -0.2, 0.35, -0.2, 0.35, -1, 0.8, -1, 0.8, 1,
                                   0.35, 1, 0.35, 0.2, -0.35, 0.2, -0.35, 1, -0.8, 1))],
    'droplet': lambda: [(1, _circle(0.62, 0, 0.35)), (1, _poly(0, -1, 0.6, 0.2, -0.6, 0.2))],
    'gear': lambda: [(1, _gear(8)), (-1, _circle(0.3))],
}
ID_SHAPES: Tuple[str, ...] = ('star', 'ring', 'cross', 'triangle', 'arrow', 'crescent', 'heart', 'bolt',
                              'letter_e', 'hourglass', 'chevron', 'letter_t')
NEAR_SHAPES: Tuple[str, ...] = ('frame', 'trefoil', 'half_disc', 'letter_h', 'droplet', 'gear')


def _rasterise(polys: Polygons, size: int, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage (size, size) float32 in [0, 1]; ``transform`` maps unit to pixel coordinates."""
    ss = size * _SUPERSAMPLE
    canvas = Image.new('L', (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    for sign, pts in polys:
        xy = transform(pts) * _SUPERSAMPLE
        draw.polygon([tuple(p) for p in xy.tolist()], fill=255 if sign > 0 else 0)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


@lru_cache(maxsize=None)
def _unit_area(name: str) -> float:
    """Area of a shape in unit coordinates (rasterised, so unions and holes count correctly)."""
    size, half = 256, 1.3
    cover = _rasterise(_SHAPES[name](), size, lambda p: (p + half) * size / (2 * half))
    return float(cover.sum()) * (2 * half / size) ** 2


# --------------------------------------------------------------------------------------- colours, textures

@lru_cache(maxsize=8)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return u, v


def _colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.random() ** 0.8, 0.1 + 0.9 * rng.random()
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _object_colour(rng: np.random.Generator, hue: Optional[float]) -> np.ndarray:
    """An object's colour: the class's typical hue if it has one (ID), any hue otherwise (near-OOD shapes);
    saturation and value are drawn alike for both, so only the hue distribution differs."""
    h = rng.random() if hue is None else (hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    s, v = 0.35 + 0.65 * rng.random() ** 0.8, 0.15 + 0.85 * rng.random()
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    return c0 + (c1 - c0) * t[..., None]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255


def _pattern(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A texture map t (size, size) in [0, 1]; colours are mixed by it. Shared by backgrounds and objects."""
    u, v = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    if kind in ('linear', 'stripes', 'checker'):
        along = u * np.cos(theta) + v * np.sin(theta)
    if kind == 'flat':
        return np.zeros((size, size), np.float32)
    if kind == 'linear':
        return (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    if kind == 'radial':
        cx, cy, r = rng.uniform(-0.2, 1.2), rng.uniform(-0.2, 1.2), rng.uniform(0.4, 1.2)
        return np.clip(np.hypot(u - cx, v - cy) / r, 0, 1)
    if kind == 'noise':
        return _smooth_noise(rng, size, int(rng.integers(2, 10)))
    if kind == 'grain':
        return _smooth_noise(rng, size, size // int(rng.integers(2, 5)))
    if kind == 'stripes':
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 10) * along + rng.uniform(0, 2 * np.pi))
        return (t > 0.5).astype(np.float32) if rng.random() < 0.5 else t
    if kind == 'checker':
        f = rng.uniform(2, 7)
        across = -u * np.sin(theta) + v * np.cos(theta)
        return ((np.floor(f * along) + np.floor(f * across)) % 2).astype(np.float32)
    if kind == 'blotches':
        canvas = Image.new('L', (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 9))):
            x, y = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(0.05, 0.25, 2) * size
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.integers(80, 256)))
        canvas = canvas.filter(ImageFilter.GaussianBlur(size / 40))
        return np.asarray(canvas, dtype=np.float32) / 255
    raise ValueError(kind)


_BASE_KINDS = ('flat', 'linear', 'radial', 'noise')
_OVERLAY_KINDS = ('stripes', 'checker', 'blotches', 'noise', 'grain', 'radial')
_FILL_KINDS = ('flat', 'flat', 'linear', 'radial', 'noise', 'grain', 'stripes', 'checker', 'blotches')


def _random_blob(rng: np.random.Generator, lobes: int = 4) -> np.ndarray:
    """A random star-shaped closed curve (unit scale): never an object class."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    r = np.ones_like(t)
    for k in range(1, lobes + 1):
        r += rng.uniform(0, 0.35 / k) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3, None)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _strokes(rng: np.random.Generator, img: Image.Image, count: int, colours: Optional[Sequence] = None) -> None:
    """Thin open strokes (lines, zigzags, waves, arcs, dots): clutter that is no object class."""
    size = img.width
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        colour = colours[int(rng.integers(len(colours)))] if colours else _colour(rng)
        fill = tuple(int(c) for c in np.asarray(colour) * 255)
        width = max(1, int(round(rng.uniform(0.6, 3.2) * size / 96)))
        x0, y0 = rng.uniform(0, size, 2)
        kind = rng.integers(5)
        if kind == 0:  # straight line
            x1, y1 = rng.uniform(0, size, 2)
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)
        elif kind == 1:  # zigzag
            pts = np.cumsum(rng.uniform(-0.2, 0.2, (int(rng.integers(3, 7)), 2)) * size, 0) + (x0, y0)
            draw.line([tuple(p) for p in pts.tolist()], fill=fill, width=width, joint='curve')
        elif kind == 2:  # wave
            s = np.linspace(0, 1, 24)
            a, length, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9) * size, rng.uniform(1, 3)
            off = rng.uniform(0.02, 0.08) * size * np.sin(2 * np.pi * freq * s)
            pts = np.stack([x0 + s * length * np.cos(a) - off * np.sin(a),
                            y0 + s * length * np.sin(a) + off * np.cos(a)], 1)
            draw.line([tuple(p) for p in pts.tolist()], fill=fill, width=width, joint='curve')
        elif kind == 3:  # open arc
            r = rng.uniform(0.08, 0.4) * size
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(40, 220), fill=fill, width=width)
        else:  # a few dots
            for x, y in rng.uniform(0, size, (int(rng.integers(3, 9)), 2)):
                r = rng.uniform(0.5, 1.8) * size / 96
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered background (size, size, 3) float32 in [0, 1]; the ``textures`` set is exactly this."""
    img = _lerp(_colour(rng), _colour(rng), _pattern(rng, size, _BASE_KINDS[rng.integers(len(_BASE_KINDS))]))
    for _ in range(int(rng.integers(1, 3))):
        t = _pattern(rng, size, _OVERLAY_KINDS[rng.integers(len(_OVERLAY_KINDS))])
        img = img + (_colour(rng) - img) * (rng.uniform(0.25, 0.8) * t)[..., None]
    # small random blobs: object-like clutter that belongs to no class
    for _ in range(int(rng.integers(0, 3))):
        r = np.sqrt(rng.uniform(0.005, 0.03) * size * size / np.pi)
        centre = rng.uniform(0, size, 2)
        cover = _rasterise([(1, _random_blob(rng))], size, lambda p: p * r + centre)
        fill = _lerp(_colour(rng), _colour(rng), _pattern(rng, size, _FILL_KINDS[rng.integers(len(_FILL_KINDS))]))
        img = img + (fill - img) * cover[..., None]
    pil = _to_pil(img)
    _strokes(rng, pil, int(rng.integers(1, 8)))
    return np.asarray(pil, dtype=np.float32) / 255


# ----------------------------------------------------------------------------------------------- scenes

def _place(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Coverage (size, size) of shape ``name`` at a random pose, its mask covering OBJECT_AREA of the image."""
    polys = _SHAPES[name]()
    lo, hi = OBJECT_AREA
    target = rng.uniform(lo + 0.02, hi - 0.02)
    angle, stretch = rng.uniform(0, 2 * np.pi), np.exp(rng.uniform(-0.18, 0.18))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shape = rot @ np.diag([stretch, 1 / stretch])
    for _ in range(4):  # the rasterised area misses the target slightly; correct it and retry
        scale = np.sqrt(target * size * size / _unit_area(name))
        m = shape * scale
        pts = np.concatenate([p for _, p in polys]) @ m.T
        lo_xy, hi_xy = pts.min(0), pts.max(0)
        extent = (hi_xy - lo_xy).max()
        if extent > size - 2:  # too big to fit: shrink (area stays within range, checked below)
            m = m * (size - 2) / extent
            lo_xy, hi_xy = lo_xy * (size - 2) / extent, hi_xy * (size - 2) / extent
        offset = rng.uniform(1 - lo_xy, np.maximum(size - 1 - hi_xy, 1 - lo_xy))
        cover = _rasterise(polys, size, lambda p: p @ m.T + offset)
        frac = float((cover >= 0.5).mean())
        if lo <= frac <= hi:
            return cover
        target = float(np.clip(target * target / frac, lo + 0.01, hi - 0.01))
    raise RuntimeError(f'could not place {name!r} at {size}px with area in {OBJECT_AREA}')


def _object_scene(rng: np.random.Generator, name: str, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Background plus one textured object; returns image (size, size, 3) and coverage (size, size)."""
    bg = _background(rng, size)
    cover = _place(rng, name, size)
    mask = cover >= 0.5
    behind = bg[mask].mean(0)
    # keep the object visible (as a photographed object is) but let it be as close to its background as that
    t = _pattern(rng, size, _FILL_KINDS[rng.integers(len(_FILL_KINDS))]) * rng.uniform(0.3, 1)
    t_mean = float(t[mask].mean())
    best, best_gap = None, -1.0
    hue = ID_SHAPES.index(name) / len(ID_SHAPES) if name in ID_SHAPES else None
    for _ in range(6):
        c0, c1 = _object_colour(rng, hue), _object_colour(rng, hue)
        gap = float(np.linalg.norm(c0 + (c1 - c0) * t_mean - behind))
        if gap > best_gap:
            best, best_gap = (c0, c1), gap
        if gap > 0.25:
            break
    fill = _lerp(*best, t)
    if rng.random() < 0.5:  # shading, as if lit from one side
        fill = fill * (0.7 + 0.5 * _pattern(rng, size, 'linear'))[..., None]
    img = bg + (fill - bg) * cover[..., None]
    if rng.random() < 0.4:  # outline
        inner = np.asarray(Image.fromarray((cover * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3)),
                           dtype=np.float32) / 255
        edge = np.clip(cover - inner, 0, 1)[..., None]
        img = img + (_colour(rng) - img) * edge
    return img, cover


def _sketch_scene(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """A line drawing on tinted paper (the ``domain`` set); returns image and the figures' coverage."""
    paper = _colour(rng)
    img = _lerp(paper, np.clip(paper + rng.normal(0, 0.06, 3), 0, 1).astype(np.float32), _pattern(rng, size, 'linear'))
    img = img + (rng.uniform(0.02, 0.08) * (_pattern(rng, size, 'grain') - 0.5))[..., None]
    inks = []
    while len(inks) < 2:
        ink = _colour(rng)
        if np.linalg.norm(ink - paper) > 0.35 or rng.random() < 0.1:
            inks.append(ink)
    cover_all = np.zeros((size, size), np.float32)
    lo, hi = OBJECT_AREA
    for _ in range(int(rng.integers(1, 4))):
        r = np.sqrt(rng.uniform(lo, hi) * size * size / np.pi) * rng.uniform(0.6, 1.0)
        blob = _random_blob(rng, lobes=int(rng.integers(2, 7)))
        centre = rng.uniform(r * 0.8, size - r * 0.8, 2)
        cover = _rasterise([(1, blob)], size, lambda p: p * r + centre)
        cover_all = np.maximum(cover_all, cover)
        ink = inks[int(rng.integers(2))]
        if rng.random() < 0.5:  # hatching inside the figure
            u, v = _grid(size)
            a = rng.uniform(0, np.pi)
            hatch = np.sin(2 * np.pi * rng.uniform(6, 14) * (u * np.cos(a) + v * np.sin(a))) > 0.6
            img = img + (ink - img) * (hatch * cover * rng.uniform(0.4, 1))[..., None]
        pil = _to_pil(img)
        draw = ImageDraw.Draw(pil)
        width = max(1, int(round(rng.uniform(0.8, 3) * size / 96)))
        for _ in range(int(rng.integers(1, 3))):  # one or two wobbly passes of the pen
            pts = blob * r + centre + rng.normal(0, 0.6 * size / 96, blob.shape)
            pts = np.concatenate([pts, pts[:1]])
            draw.line([tuple(p) for p in pts.tolist()], fill=tuple(int(c) for c in ink * 255), width=width,
                      joint='curve')
        img = np.asarray(pil, dtype=np.float32) / 255
    pil = _to_pil(img)
    _strokes(rng, pil, int(rng.integers(2, 10)), colours=inks)
    return np.asarray(pil, dtype=np.float32) / 255, cover_all


def _finish(rng: np.random.Generator, img: np.ndarray) -> Image.Image:
    """Camera-like degradations shared by every split: sensor noise and slight defocus."""
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 0.04)
    pil = _to_pil(img)
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * img.shape[0] / 96))
    return pil


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines the benchmark's pixels; saved in ``benchmark.json``.

    Attributes:
        num_classes: K, the number of ID classes (the first K of :data:`ID_SHAPES`), at most 12.
        image_size: side of the square images, in pixels.
        train_per_class: ID training images per class.
        val_per_class: ID validation (and test) images per class.
        ood_per_set: images in each OOD set.
        seed: the root seed; image ``i`` of split ``s`` is drawn from its own generator seeded by (seed, s, i).
    """
    num_classes: int = 10
    image_size: int = 96
    train_per_class: int = 400
    val_per_class: int = 100
    ood_per_set: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(ID_SHAPES):
            raise ValueError(f'num_classes must be in [2, {len(ID_SHAPES)}], got {self.num_classes}')
        if self.image_size < 32:
            raise ValueError(f'image_size must be at least 32, got {self.image_size}')
        if self.seed < 0:
            raise ValueError(f'seed must be non-negative, got {self.seed}')
        if min(self.train_per_class, self.val_per_class, self.ood_per_set) < 1:
            raise ValueError('train_per_class, val_per_class and ood_per_set must be positive')

    @property
    def class_names(self) -> List[str]:
        """ID class names, sorted, so that label i is ``class_names[i]`` here and in ImageFolder alike."""
        return sorted(ID_SHAPES[:self.num_classes])

    def split_size(self, split: str) -> int:
        if split == 'train':
            return self.num_classes * self.train_per_class
        if split == 'val':
            return self.num_classes * self.val_per_class
        if split in OOD_SETS:
            return self.ood_per_set
        raise ValueError(f'unknown split {split!r}; expected one of {list(_SPLITS)}')


class Sample(NamedTuple):
    """One rendered image. Unpacks like a tuple: ``image, mask, label = render('train', 0)``.

    Attributes:
        image: RGB PIL image (image_size x image_size), exactly the pixels stored on disk.
        mask: (H, W) bool, where the object is (ID and ``near``), the figures (``domain``), or all False
            (``textures``).
        label: the class index into ``class_names`` for ``train``/``val``; -1 for OOD sets.
    """
    image: Image.Image
    mask: np.ndarray
    label: int


def render(split: str, index: int, config: BenchmarkConfig = BenchmarkConfig()) -> Sample:
    """Render image ``index`` of ``split`` ('train', 'val' or an OOD set); deterministic, no disk.

    ID image ``i`` is of class ``i % num_classes``.
    """
    n = config.split_size(split)
    if not 0 <= index < n:
        raise IndexError(f'{split} has {n} images, got index {index}')
    rng = np.random.default_rng([config.seed, _SPLITS[split], index])
    size = config.image_size
    label = -1
    if split in ('train', 'val'):
        label = index % config.num_classes
        img, cover = _object_scene(rng, config.class_names[label], size)
    elif split == 'near':
        img, cover = _object_scene(rng, NEAR_SHAPES[index % len(NEAR_SHAPES)], size)
    elif split == 'textures':
        img, cover = _background(rng, size), np.zeros((size, size), np.float32)
    else:
        img, cover = _sketch_scene(rng, size)
    return Sample(_finish(rng, img), cover >= 0.5, label)


# ------------------------------------------------------------------------------------------- the cache

def _relpath(config: BenchmarkConfig, split: str, index: int) -> str:
    if split in ('train', 'val'):
        return f'id/{split}/{config.class_names[index % config.num_classes]}/{index:06d}.png'
    return f'ood/{split}/{split}/{index:06d}.png'


def _render_chunk(job: Tuple[dict, str, str, int, int]) -> int:
    """Worker: render images [start, stop) of a split into ``root``; returns how many."""
    config, root, split, start, stop = job
    config = BenchmarkConfig(**config)
    for i in range(start, stop):
        path = os.path.join(root, _relpath(config, split, i))
        render(split, i, config).image.save(path, format='PNG', compress_level=_PNG_COMPRESS)
    return stop - start


def _progress_bar(progress: Union[bool, Callable[[int, int], None]], total: int):
    """Returns (update(done), close()) for a bool (tqdm if installed, else stderr lines) or a callback."""
    if callable(progress):
        return (lambda done: progress(done, total)), (lambda: None)
    if not progress:
        return (lambda done: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        state = {'shown': -1}

        def update(done):
            tenth = 10 * done // total
            if tenth != state['shown']:
                state['shown'] = tenth
                print(f'synthetic benchmark: {done}/{total} images', file=sys.stderr, flush=True)
        return update, (lambda: None)
    bar = tqdm(total=total, desc='synthetic benchmark', unit='img')
    return (lambda done: bar.update(done - bar.n)), bar.close


class SyntheticBenchmark:
    """The benchmark on disk: generated once per config, reused after (see the module docstring for layout).

    Args:
        root: the benchmark's directory. It is created, or replaced when it holds another config's benchmark;
            a non-empty directory without ``benchmark.json`` is never touched.
        config: what to generate; the defaults make a 10-class benchmark of 8,000 96x96 images.
    """

    def __init__(self, root: Union[str, os.PathLike], config: Optional[BenchmarkConfig] = None):
        self.root = Path(root)
        self.config = config or BenchmarkConfig()

    @property
    def class_names(self) -> List[str]:
        return self.config.class_names

    @property
    def ood_sets(self) -> Tuple[str, ...]:
        return OOD_SETS

    def render(self, split: str, index: int) -> Sample:
        """Image ``index`` of ``split`` with its object mask and label, rendered afresh (see :func:`render`)."""
        return render(split, index, self.config)

    def _meta(self) -> dict:
        return {'version': GENERATOR_VERSION, 'config': dataclasses.asdict(self.config),
                'class_names': self.class_names, 'ood_sets': list(OOD_SETS),
                'object_area': list(OBJECT_AREA)}

    def _jobs(self, root: Path, chunk: int = 50) -> Iterator[Tuple[dict, str, str, int, int]]:
        config = dataclasses.asdict(self.config)
        for split in _SPLITS:
            n = self.config.split_size(split)
            for start in range(0, n, chunk):
                yield config, str(root), split, start, min(start + chunk, n)

    def _expected(self) -> Dict[str, set]:
        files: Dict[str, set] = {}
        for split in _SPLITS:
            for i in range(self.config.split_size(split)):
                folder, name = _relpath(self.config, split, i).rsplit('/', 1)
                files.setdefault(folder, set()).add(name)
        return files

    def _meta_matches(self) -> bool:
        try:
            meta = json.loads((self.root / 'benchmark.json').read_text())
        except (OSError, ValueError):
            return False
        return meta.get('version') == GENERATOR_VERSION and meta.get('config') == dataclasses.asdict(self.config)

    def is_prepared(self) -> bool:
        """Whether ``root`` holds this exact config and generator version, with every image present."""
        if not self._meta_matches():
            return False
        for folder, names in self._expected().items():
            try:
                present = set(os.listdir(self.root / folder))
            except OSError:
                return False
            if not names <= present:
                return False
        return True

    def prepare(self, workers: int = 2, progress: Union[bool, Callable[[int, int], None]] = True
                ) -> 'SyntheticBenchmark':
        """Generate the benchmark unless ``root`` already holds it; returns self.

        Images are written into a temporary sibling directory, ``benchmark.json`` last, and the directory is
        renamed into place only when complete, so an interrupted run never leaves a cache that passes
        :meth:`is_prepared`.

        Args:
            workers: processes to render with (the images do not depend on it); <= 1 renders in this process.
            progress: True for a progress bar (tqdm if installed, else lines on stderr), False for none, or a
                callback ``(done, total)``.
        """
        if self.is_prepared():
            return self
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / 'benchmark.json').exists():
            raise FileExistsError(f'{self.root} is not empty and holds no benchmark.json; refusing to replace it')
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{self.root.name}.partial-', dir=self.root.parent))
        try:
            for folder in self._expected():
                (tmp / folder).mkdir(parents=True, exist_ok=True)
            jobs = list(self._jobs(tmp))
            total = sum(job[4] - job[3] for job in jobs)
            update, close = _progress_bar(progress, total)
            done = 0
            update(done)
            try:
                if workers <= 1:
                    for job in jobs:
                        done += _render_chunk(job)
                        update(done)
                else:
                    # not plain fork: forking a process whose torch/OpenMP threads hold locks can deadlock the
                    # children (seen inside the test suite). A fork server imports this module once, cleanly,
                    # and forks the workers from itself.
                    if sys.platform.startswith('linux'):
                        ctx = multiprocessing.get_context('forkserver')
                        ctx.set_forkserver_preload([__name__])
                    else:
                        ctx = multiprocessing.get_context()
                    with ctx.Pool(workers) as pool:
                        for n in pool.imap_unordered(_render_chunk, jobs):
                            done += n
                            update(done)
            finally:
                close()
            (tmp / 'benchmark.json').write_text(json.dumps(self._meta(), indent=2))
            self._install(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self

    def _install(self, tmp: Path) -> None:
        """Move a complete benchmark from ``tmp`` to ``root``, replacing an outdated one."""
        old = None
        if self.root.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{self.root.name}.old-', dir=self.root.parent))
            os.replace(self.root, old / 'benchmark')
        os.replace(tmp, self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _folder(self, *parts: str) -> str:
        if not self._meta_matches():
            raise RuntimeError(f'{self.root} does not hold this benchmark; call prepare() first')
        return str(self.root.joinpath(*parts))

    def train_dataset(self, transform: Optional[Callable] = None) -> ImageFolder:
        """ID training images; labels index :attr:`class_names`."""
        return ImageFolder(self._folder('id', 'train'), transform=transform)

    def val_dataset(self, transform: Optional[Callable] = None) -> ImageFolder:
        """ID validation images (the ID side of every OOD evaluation); labels index :attr:`class_names`."""
        return ImageFolder(self._folder('id', 'val'), transform=transform)

    def ood_datasets(self, transform: Optional[Callable] = None) -> Dict[str, ImageFolder]:
        """One ImageFolder per OOD set, in :data:`OOD_SETS` order; their labels (all 0) mean nothing."""
        return {name: ImageFolder(self._folder('ood', name), transform=transform) for name in OOD_SETS}
