"""ShapeEval: an analytic, GenEval-style judge of ShapeWorld images.

No learned model: pixels are classified by hue (background is unsaturated grey), objects
are connected components of one colour, shape comes from how much of its bounding box an
object fills (square ~1, circle ~pi/4, triangle ~1/2), size from its extent.  Each task tag
checks what GenEval checks for it.  Because it is analytic, a reward hack shows up as a gap
between the learned reward and this score.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import world

_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in world.COLORS.items()}
MIN_SATURATION = 0.35
MIN_VALUE = 0.25
MIN_AREA = 8  # pixels; smaller blobs are noise
SMALL_MAX_EXTENT = 10  # a "small" object spans 8 pixels when drawn, a "big" one 13


@dataclass
class Detection:
    color: str
    shape: str
    size: str
    cx: float
    cy: float
    area: int


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b)
    return np.minimum(d, 1 - d)


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """(H, W) int map: -1 background or unsure, else the index of the nearest palette colour."""
    rgb = np.clip(img, 0, 1)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    delta = np.maximum(mx - mn, 1e-6)
    hue = np.select([mx == r, mx == g], [((g - b) / delta) % 6, (b - r) / delta + 2], (r - g) / delta + 4) / 6.0
    dists = np.stack([_hue_distance(hue, h) for h in _HUES.values()], -1)
    label = dists.argmin(-1)
    label[(sat < MIN_SATURATION) | (mx < MIN_VALUE)] = -1
    return label


def _shape_of(mask: np.ndarray) -> tuple[str, str]:
    """The shape whose ideal template, fitted to the object's bounding box, overlaps it best (IoU)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    half = max(h, w) / 2.0
    obj = mask[y0:y1, x0:x1].astype(np.float32)
    best, best_iou = "circle", -1.0
    for name in world.SHAPES:
        tmpl = world.render_scene([world.Shape(name, "red", w / 2.0, h / 2.0, half)], size=max(h, w))[:h, :w]
        cover = (tmpl[..., 1] < 0.5).astype(np.float32)  # red pixels have low green
        iou = (obj * cover).sum() / max(np.maximum(obj, cover).sum(), 1.0)
        if iou > best_iou:
            best, best_iou = name, iou
    size = "small" if max(h, w) <= SMALL_MAX_EXTENT else "big"
    return best, size


def detect(img: np.ndarray) -> list[Detection]:
    """The objects in an image (H, W, 3) in [0, 1]."""
    labels = classify_pixels(img)
    names = list(_HUES)
    found = []
    for ci, name in enumerate(names):
        comp, n = ndimage.label(labels == ci)
        for k in range(1, n + 1):
            mask = comp == k
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            shape, size = _shape_of(mask)
            ys, xs = np.nonzero(mask)
            found.append(Detection(name, shape, size, float(xs.mean()), float(ys.mean()), area))
    return found


def _matches(d: Detection, o: world.ObjectSpec, check_color: bool = True) -> bool:
    return d.shape == o.shape and (o.size is None or d.size == o.size) and (not check_color or o.color is None or d.color == o.color)


def _offset(a: Detection, b: Detection, rel: str) -> float:
    """How far a lies from b in the direction `rel` names (pixels; negative: the other way)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    return {"left": -dx, "right": dx, "above": -dy, "below": dy}[rel]


def _relation(a: Detection, b: Detection, rel: str) -> bool:
    return _offset(a, b, rel) > 3.0


def check(img: np.ndarray, prompt: str) -> bool:
    """Does the image satisfy its prompt, by the rule of the prompt's task tag?"""
    spec = world.parse(prompt)
    dets = detect(img)
    o = spec.objects
    if spec.tag == "single_object":
        return len(dets) == 1 and _matches(dets[0], o[0], check_color=False)
    if spec.tag == "colors":
        return len(dets) == 1 and _matches(dets[0], o[0])
    if spec.tag == "counting":
        return len(dets) == 2 and all(_matches(d, o[0]) for d in dets)
    if spec.tag == "two_objects":
        return len(dets) == 2 and sorted(d.shape for d in dets) == sorted(x.shape for x in o)
    if spec.tag == "color_attr":
        return len(dets) == 2 and any(_matches(a, o[0]) and _matches(b, o[1]) for a, b in (dets, dets[::-1]))
    if spec.tag == "position":
        return _position_parts(dets, spec)[1]
    raise ValueError(spec.tag)


def _pairs(dets: list[Detection], spec: world.PromptSpec) -> list[tuple[Detection, Detection]]:
    """Every (first object, second object) pair drawn as a position prompt asks, wherever it is."""
    return [(a, b) for a in dets for b in dets if a is not b and _matches(a, spec.objects[0]) and _matches(b, spec.objects[1])]


def _position_parts(dets: list[Detection], spec: world.PromptSpec) -> tuple[bool, bool]:
    pairs = _pairs(dets, spec)
    return bool(pairs), any(_relation(a, b, spec.relation) for a, b in pairs)


def _position_spec(prompt: str) -> world.PromptSpec:
    spec = world.parse(prompt)
    if spec.tag != "position":
        raise ValueError(f"{prompt!r} is not a position prompt")
    return spec


def relation_offset(img: np.ndarray, prompt: str) -> float | None:
    """How far a position prompt's first object lies from its second in the stated direction (pixels; > 3 passes),
    for the best-placed pair drawn as asked; None when no such pair is drawn.  For the same noise, a model that
    ignores the relation word draws the same layout for "A left of B" and "A right of B", so the two offsets cancel
    and at most one of the two prompts passes."""
    spec = _position_spec(prompt)
    pairs = _pairs(detect(img), spec)
    return max(_offset(a, b, spec.relation) for a, b in pairs) if pairs else None


def position_parts(img: np.ndarray, prompt: str) -> tuple[bool, bool]:
    """A position prompt's pass in two parts: (both objects drawn as asked, anywhere; and a pair of them in the stated
    relation, i.e. the pass).  Separates "cannot draw the two objects" from "draws them but ignores the relation"."""
    spec = _position_spec(prompt)
    return _position_parts(detect(img), spec)


def evaluate(images, prompts: list[str]) -> dict:
    """Per-tag accuracy and `overall` (mean over the tags present), GenEval style.

    `images`: a tensor (B, 3, H, W) or array (B, H, W, 3) in [0, 1].
    """
    arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy() if hasattr(images, "detach") else np.asarray(images)
    if len(arr) != len(prompts):
        raise ValueError(f"got {len(arr)} images for {len(prompts)} prompts")
    per_tag: dict[str, list[bool]] = {}
    for img, p in zip(arr, prompts):
        per_tag.setdefault(world.parse(p).tag, []).append(check(img, p))
    result = {tag: float(np.mean(v)) for tag, v in per_tag.items()}
    ordered = {t: result[t] for t in world.TAGS if t in result}
    return {"overall": float(np.mean(list(ordered.values()))), **ordered}
