"""ShapeWorld: the caption grammar, its prompt sets, and a seeded anti-aliased renderer.

One grammar serves three readers: the renderer (prompt -> scene -> pixels), the
evaluator (prompt -> what must be true of the image) and the prompt sets.
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (0.92, 0.92, 0.92)
# Hue-separated, saturated colours on a grey background: easy to tell apart by hue.
COLORS = {
    "red": (0.86, 0.10, 0.10),
    "yellow": (0.93, 0.83, 0.08),
    "green": (0.10, 0.68, 0.18),
    "cyan": (0.08, 0.74, 0.80),
    "blue": (0.12, 0.22, 0.90),
    "purple": (0.62, 0.15, 0.78),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "big": 6.5}  # half-extent in pixels
RELATIONS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
TAGS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
PLURAL = {s: s + "s" for s in SHAPES}


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object; None means 'any'."""

    shape: str
    color: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its task tag, its objects and, for `position`, the relation."""

    tag: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # left/right/above/below: objects[0] REL objects[1]


def _phrase(o: ObjectSpec) -> str:
    words = [w for w in (o.size, o.color, o.shape) if w]
    return " ".join(words)


def _article(o: ObjectSpec) -> str:
    return "a " + _phrase(o)


def caption(spec: PromptSpec) -> str:
    """The one sentence of the grammar that describes `spec`."""
    o = spec.objects
    if spec.tag in ("single_object", "colors"):
        return _article(o[0])
    if spec.tag == "counting":
        words = [w for w in (o[0].color, PLURAL[o[0].shape]) if w]
        return "two " + " ".join(words)
    if spec.tag in ("two_objects", "color_attr"):
        return f"{_article(o[0])} and {_article(o[1])}"
    if spec.tag == "position":
        rel = {v: k for k, v in RELATIONS.items()}[spec.relation]
        return f"{_article(o[0])} {rel} {_article(o[1])}"
    raise ValueError(f"unknown tag {spec.tag!r}")


def _parse_object(words: list[str]) -> ObjectSpec:
    size = words.pop(0) if words and words[0] in SIZES else None
    color = words.pop(0) if words and words[0] in COLORS else None
    if len(words) != 1 or words[0] not in SHAPES:
        raise ValueError
    return ObjectSpec(words[0], color, size)


def parse(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar back into its spec (raises ValueError for anything else)."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    try:
        if text.startswith("two "):
            words = text.split()[1:]
            color = words.pop(0) if words[0] in COLORS else None
            shape = {v: k for k, v in PLURAL.items()}[words[0]]
            if len(words) != 1:
                raise ValueError
            return PromptSpec("counting", (ObjectSpec(shape, color), ObjectSpec(shape, color)))
        for rel_words, rel in RELATIONS.items():
            marker = f" {rel_words} "
            if marker in text:
                a, b = text.split(marker)
                return PromptSpec("position", (_parse_obj_phrase(a), _parse_obj_phrase(b)), rel)
        if " and " in text:
            a, b = text.split(" and ")
            oa, ob = _parse_obj_phrase(a), _parse_obj_phrase(b)
            tag = "color_attr" if oa.color and ob.color else "two_objects"
            return PromptSpec(tag, (oa, ob))
        o = _parse_obj_phrase(text)
        return PromptSpec("colors" if o.color else "single_object", (o,))
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{prompt!r} is not a ShapeWorld prompt (see leapalign.shapeworld.prompts('train') for examples)") from None


def _parse_obj_phrase(text: str) -> ObjectSpec:
    words = text.split()
    if not words or words[0] != "a":
        raise ValueError
    return _parse_object(words[1:])


# ----------------------------------------------------------------------------- prompt sets

def _all_specs() -> list[PromptSpec]:
    specs: list[PromptSpec] = []
    for size in (None, *SIZES):
        for shape in SHAPES:
            specs.append(PromptSpec("single_object", (ObjectSpec(shape, None, size),)))
            for color in COLORS:
                specs.append(PromptSpec("colors", (ObjectSpec(shape, color, size),)))
    for shape in SHAPES:
        for color in (None, *COLORS):
            specs.append(PromptSpec("counting", (ObjectSpec(shape, color),) * 2))
    for s1 in SHAPES:
        for s2 in SHAPES:
            if s1 != s2:
                specs.append(PromptSpec("two_objects", (ObjectSpec(s1), ObjectSpec(s2))))
    objs = [ObjectSpec(s, c) for c in COLORS for s in SHAPES]
    for a in objs:
        for b in objs:
            if a == b:
                continue
            for rel in RELATIONS.values():
                specs.append(PromptSpec("position", (a, b), rel))
            if a.color != b.color and a.shape != b.shape:
                specs.append(PromptSpec("color_attr", (a, b)))
    return specs


def _held_out(spec: PromptSpec) -> bool:
    """Compositions of two described objects kept out of `train`: one pair in five."""
    if spec.tag not in ("position", "color_attr"):
        return False
    pair = sorted(_phrase(o) for o in spec.objects)
    return zlib.crc32(("|".join(pair)).encode()) % 5 == 0


EVAL_PER_TAG = 48


@lru_cache(maxsize=None)
def _build_sets() -> dict[str, list[dict]]:
    specs = _all_specs()
    train = [{"prompt": caption(s), "tag": s.tag} for s in specs if not _held_out(s)]
    rng = random.Random(2026)
    eval_rows = []
    for tag in TAGS:
        pool = [s for s in specs if s.tag == tag and (_held_out(s) or tag not in ("position", "color_attr"))]
        pool = sorted(pool, key=caption)
        picks = rng.sample(pool, EVAL_PER_TAG) if len(pool) >= EVAL_PER_TAG else [pool[i % len(pool)] for i in range(EVAL_PER_TAG)]
        eval_rows += [{"prompt": caption(s), "tag": tag} for s in picks]
    for i, row in enumerate(eval_rows):
        row["seed"] = i
    return {"train": train, "eval": eval_rows}


PROMPT_SETS = ("train", "eval")


def prompt_rows(name: str) -> list[dict]:
    """Rows {"prompt", "tag"[, "seed"]} of a named prompt set, read from the shipped file."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown ShapeWorld prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    text = resources.files("leapalign.shapeworld").joinpath(f"data/{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompts(name: str) -> list[str]:
    """The prompts of a named set: `train` (every composition but the held-out ones) or `eval`."""
    return [r["prompt"] for r in prompt_rows(name)]


def write_prompt_files(directory) -> None:
    """Regenerate data/train.jsonl and data/eval.jsonl from the grammar."""
    from pathlib import Path

    for name, rows in _build_sets().items():
        Path(directory, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- scenes and rendering

@dataclass(frozen=True)
class Shape:
    """One drawn object: shape, colour name, centre (x, y) in pixels, half-extent."""

    shape: str
    color: str
    cx: float
    cy: float
    half: float


def _fits(objs: list[Shape], cand: Shape, gap: float = 2.0) -> bool:
    for o in objs:
        if abs(o.cx - cand.cx) < o.half + cand.half + gap and abs(o.cy - cand.cy) < o.half + cand.half + gap:
            return False
    return True


def _relation_holds(a: Shape, b: Shape, rel: str, margin: float) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    return {"left": -dx, "right": dx, "above": -dy, "below": dy}[rel] >= margin


def sample_scene(spec: PromptSpec, rng: random.Random) -> list[Shape]:
    """A random scene that satisfies `spec`: free attributes drawn at random, no overlaps."""
    colors = list(COLORS)
    for _ in range(1000):
        objs: list[Shape] = []
        used_colors: set[str] = set()
        for o in spec.objects:
            color = o.color
            if color is None:
                # unnamed colours differ between the objects so each is its own component
                color = rng.choice([c for c in colors if c not in used_colors] if spec.tag != "counting" or not objs else [objs[0].color])
            used_colors.add(color)
            half = SIZES[o.size] if o.size else rng.choice(list(SIZES.values()))
            if spec.tag == "counting" and objs:
                half = objs[0].half
            lo, hi = half + 1.0, IMAGE_SIZE - half - 1.0
            cand = Shape(o.shape, color, rng.uniform(lo, hi), rng.uniform(lo, hi), half)
            if not _fits(objs, cand):
                break
            objs.append(cand)
        else:
            if spec.relation and not _relation_holds(objs[0], objs[1], spec.relation, margin=objs[0].half + objs[1].half + 2):
                continue
            return objs
    raise RuntimeError(f"could not place the objects of {caption(spec)!r}")


def _coverage(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - shape.cx, ys - shape.cy
    h = shape.half
    if shape.shape == "circle":
        return (dx * dx + dy * dy) <= h * h
    if shape.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # isosceles triangle, apex up, base 2h wide and 2h tall
    t = (dy + h) / (2 * h)  # 0 at apex, 1 at base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)


_SS = 4  # supersampling factor for anti-aliasing


def render_scene(objs: list[Shape], size: int = IMAGE_SIZE) -> np.ndarray:
    """Float32 image (H, W, 3) in [0, 1], anti-aliased by 4x4 supersampling."""
    n = size * _SS
    coords = (np.arange(n) + 0.5) / _SS
    xs, ys = np.meshgrid(coords, coords)
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for o in objs:
        img[_coverage(o, xs, ys)] = COLORS[o.color]
    return img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))


def render(prompt: str, seed: int = 0) -> np.ndarray:
    """Render one random scene for `prompt` (deterministic in `seed`)."""
    return render_scene(sample_scene(parse(prompt), random.Random(seed)))


def render_batch(prompt_list: list[str], seeds: list[int] | None = None):
    """Torch tensor (B, 3, H, W) in [0, 1] of renders of the prompts."""
    import torch

    seeds = seeds if seeds is not None else list(range(len(prompt_list)))
    arr = np.stack([render(p, s) for p, s in zip(prompt_list, seeds)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def random_scene(rng: random.Random, tag_weights: dict[str, float] | None = None) -> tuple[str, list[Shape]]:
    """A random training pair: a tag (uniform, or by `tag_weights`), then a train-set prompt of it, then a scene."""
    specs = _train_specs()
    tag = rng.choices(TAGS, weights=[(tag_weights or {}).get(t, 1.0) for t in TAGS])[0] if tag_weights else rng.choice(TAGS)
    spec = rng.choice(specs[tag])
    return caption(spec), sample_scene(spec, rng)


@lru_cache(maxsize=None)
def _train_specs() -> dict[str, list[PromptSpec]]:
    by_tag: dict[str, list[PromptSpec]] = {t: [] for t in TAGS}
    for p in prompts("train"):
        spec = parse(p)
        by_tag[spec.tag].append(spec)
    return by_tag


def vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    words = {"a", "two", "and", "to", "the", "left", "right", "of", "above", "below"}
    words |= set(COLORS) | set(SHAPES) | set(PLURAL.values()) | set(SIZES)
    return sorted(words)


def flip_relation(prompt: str) -> str:
    """A position prompt with the opposite relation ("left of" <-> "right of", "above" <-> "below")."""
    spec = parse(prompt)
    if spec.tag != "position":
        raise ValueError(f"{prompt!r} is not a position prompt")
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    return caption(PromptSpec("position", spec.objects, opposite[spec.relation]))


def mismatch(prompt: str, rng: random.Random) -> str:
    """A prompt of the same tag that an image of `prompt` cannot satisfy (for evaluator tests)."""
    spec = parse(prompt)
    o = list(spec.objects)
    other = lambda seq, x: rng.choice([v for v in seq if v != x])  # noqa: E731
    if spec.tag == "position":
        return flip_relation(prompt)
    if spec.tag == "color_attr":
        a, b = o
        return caption(PromptSpec("color_attr", (ObjectSpec(a.shape, b.color), ObjectSpec(b.shape, a.color))))
    if spec.tag == "two_objects":
        third = [s for s in SHAPES if s not in (o[0].shape, o[1].shape)][0]
        return caption(PromptSpec("two_objects", (ObjectSpec(third), o[1])))
    if spec.tag == "counting":
        new = ObjectSpec(other(SHAPES, o[0].shape), o[0].color)
        return caption(PromptSpec("counting", (new, new)))
    if spec.tag == "colors":
        return caption(PromptSpec("colors", (ObjectSpec(o[0].shape, other(list(COLORS), o[0].color), o[0].size),)))
    return caption(PromptSpec("single_object", (ObjectSpec(other(SHAPES, o[0].shape), None, o[0].size),)))


def add_object(objs: list[Shape], rng: random.Random) -> list[Shape] | None:
    """`objs` plus one random extra object placed without overlap (None if it does not fit): a count negative."""
    for _ in range(200):
        half = rng.choice(list(SIZES.values()))
        lo, hi = half + 1.0, IMAGE_SIZE - half - 1.0
        cand = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.uniform(lo, hi), rng.uniform(lo, hi), half)
        if _fits(objs, cand):
            return [*objs, cand]
    return None
