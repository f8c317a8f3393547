"""Cheap images that a reward must not prefer to a truth render: the reward-hacking probes of ShapeWorld.

Each hack takes a truth scene (its render and its objects) and returns an image (3, H, W) in [0, 1] that a
lazy or greedy policy could draw instead, or None where the scene leaves no room for it.  The tests assert that ShapeMatch scores every one below the truth;
`benchmarks/reward_hacks.py` tabulates how each reward scores them.
"""
from __future__ import annotations

import random

import torch

from . import world


def render(objs: list[world.Shape]) -> torch.Tensor:
    return torch.from_numpy(world.render_scene(objs)).permute(2, 0, 1)


def truth(prompt: str, seed: int) -> tuple[torch.Tensor, list[world.Shape]]:
    """A render of `prompt` and its objects (the same scene as `world.render(prompt, seed)`)."""
    objs = world.sample_scene(world.parse(prompt), random.Random(seed))
    return render(objs), objs


def blob(img, objs, rng):
    """One big disc of the first object's colour: 'more of the right colour'."""
    return render([world.Shape("circle", objs[0].color, 16.0, 16.0, 11.0)])


def extra_object(img, objs, rng):
    """The truth plus one random object (None where no object fits beside the truth's)."""
    more = world.add_object(objs, rng)
    return render(more) if more else None


def hedge(img, objs, rng):
    """The truth plus every shape in the first object's colour where they fit: hedging on the shape."""
    out = list(objs)
    for s in world.SHAPES:
        extra = world.add_object(out, rng)
        if extra:
            out = [*out, world.Shape(s, objs[0].color, extra[-1].cx, extra[-1].cy, extra[-1].half)]
    return render(out) if len(out) > len(objs) else None


def smear(img, objs, rng):
    """A wash of the first object's colour over the whole canvas, the objects left in place."""
    return 0.75 * img + 0.25 * torch.tensor(world.COLORS[objs[0].color]).view(3, 1, 1)


def noise(img, objs, rng):
    """Gaussian pixel noise (std 0.06) over the truth: anti-aliasing-like speckle."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (img + 0.06 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def blank(img, objs, rng):
    """Nothing drawn."""
    return render([])


def merged(img, objs, rng):
    """Two objects overlapping (the second moved onto the first; a one-object prompt gets a twin on top)."""
    a = objs[0]
    b = objs[1] if len(objs) > 1 else a
    return render([a, world.Shape(b.shape, b.color, a.cx + a.half, a.cy + 1.0, b.half)])


def wrong_size(img, objs, rng):
    """Every object at the other size."""
    swap = {world.SIZES["small"]: world.SIZES["big"], world.SIZES["big"]: world.SIZES["small"]}
    return render([world.Shape(o.shape, o.color, o.cx, o.cy, swap[o.half]) for o in objs])


HACKS = {f.__name__: f for f in (blob, extra_object, hedge, smear, noise, blank, merged, wrong_size)}
