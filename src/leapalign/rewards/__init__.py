"""Rewards are plug-ins: any callable (images (B,3,H,W) in [0,1], prompts) -> (B,) differentiable in images.

`reward.fn` names one: a built-in (see BUILTIN), "package.module:callable", or
"path/to/file.py:callable".  A class is instantiated with no arguments.
A weighted sum of several is a dict {"hpsv2.1": 1.0, "pickscore": 0.5} or the string
"hpsv2.1=1.0,pickscore=0.5"; `score` returns its value and each part's values.
Where the built-ins' weights live: builtin.py and docs/rewards.md.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError

RewardFn = Callable[[torch.Tensor, list], torch.Tensor]


def _builtin(factory: str, name: str, path: str | None = None) -> RewardFn:
    from . import builtin

    return getattr(builtin, factory)(name, path)


# name -> factory(path); plug-ins add theirs (the embedded ShapeWorld: shapematch, shapescore)
BUILTIN: dict[str, Callable[..., RewardFn]] = {
    "hpsv2": partial(_builtin, "hpsv2", "hpsv2"),
    "hpsv2.1": partial(_builtin, "hpsv2", "hpsv2.1"),
    "pickscore": partial(_builtin, "pickscore", "pickscore"),
    "clipscore": partial(_builtin, "clipscore", "clipscore"),
    "aesthetic": partial(_builtin, "aesthetic", "aesthetic"),
    "imagereward": partial(_builtin, "imagereward", "imagereward"),
}


# The hinge max(0, lam - r) * scale each built-in trains with unless reward.lam / reward.scale say otherwise:
# the margin of the paper that trained on the reward, on our reward's own scale (docs/rewards.md: ranges, sources).
HINGE: dict[str, tuple[float, float]] = {
    "hpsv2": (0.55, 1.0),  # LeapAlign: 0.55 on HPSv2.1's cosine (FLUX.1-dev scores about 0.31)
    "hpsv2.1": (0.55, 1.0),
    "pickscore": (40.0, 0.01),  # LeapAlign: 0.4 on the cosine; ours is 100 cos (PickScore's logit scale), so 40 x 0.01
    "clipscore": (2.5, 1.0),  # no published margin: the score's maximum, every sample trains
    "aesthetic": (10.0, 1.0),  # no published margin: the top of the 1-10 scale
    "imagereward": (2.0, 1e-3),  # ImageReward's ReFL: relu(2 - r) * grad_scale 1e-3
}


def default_hinge(fn) -> tuple[float, float] | None:
    """(lam, scale) a built-in reward trains with by default; None for a user's reward or a weighted sum."""
    return HINGE.get(fn) if isinstance(fn, str) else None


def _import_callable(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"reward.fn {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'module:callable' / 'file.py:callable'")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"reward file {path} does not exist (reward.fn={spec!r})")
        mod_spec = importlib.util.spec_from_file_location(f"leapalign_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file failed to import: say where, not a traceback
            raise UserError(f"importing reward file {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"reward module {target!r} cannot be imported ({e}); check reward.fn or your PYTHONPATH") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(attr, names, n=1)
        raise UserError(f"{target} has no attribute {attr!r}" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    obj = getattr(module, attr)
    if inspect.isclass(obj):
        obj = obj()
    if not callable(obj):
        raise UserError(f"reward.fn {spec!r} is not callable")
    return obj


class CheckedReward:
    """A reward whose every call is checked: a wrong shape is one clear error, and so is a non-finite value unless
    the caller takes it (`score(..., check_finite=False)`: the trainer skips such a step itself)."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn, self.name = fn, name

    def score(self, images: torch.Tensor, prompts: list[str], check_finite: bool = True) -> tuple[torch.Tensor, dict]:
        """(values (B,), {name: values (B,)}): the components a weighted sum adds up (unweighted, detached), or this one."""
        if isinstance(self.fn, WeightedReward):
            out, parts = self.fn.score(images, prompts, check_finite)
        else:
            out, parts = self.fn(images, prompts), None
        if not isinstance(out, torch.Tensor) or out.shape != (len(prompts),):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"reward {self.name} returned {shape}; a reward must return a tensor of shape ({len(prompts)},), one value per image")
        if check_finite and not torch.isfinite(out).all():
            raise UserError(f"reward {self.name} returned non-finite values {out.detach().cpu().tolist()}")
        return out, parts if parts is not None else {self.name: out.detach()}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(images, prompts)[0]

    def to(self, device):
        if hasattr(self.fn, "to"):
            self.fn.to(device)
        return self


class WeightedReward:
    """sum_i w_i * r_i(images, prompts), differentiable; `score` also returns each r_i (detached, unweighted)."""

    def __init__(self, parts: dict[str, tuple[float, CheckedReward]]):
        self.parts = parts
        self.weights = {name: w for name, (w, _) in parts.items()}

    def score(self, images: torch.Tensor, prompts: list[str], check_finite: bool = True) -> tuple[torch.Tensor, dict]:
        total, comps = None, {}
        for name, (w, fn) in self.parts.items():
            r, _ = fn.score(images, prompts, check_finite)
            comps[name] = r.detach()
            total = w * r if total is None else total + w * r
        return total, comps

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(images, prompts)[0]

    def to(self, device):
        for _, fn in self.parts.values():
            fn.to(device)
        return self


def scores(reward, images: torch.Tensor, prompts: list[str], check_finite: bool = False) -> tuple[torch.Tensor, dict]:
    """(values, components) of a loaded reward, or of any plain callable (no components); non-finite values pass
    unless asked: the trainer skips a non-finite step and an evaluation reports NaN."""
    if hasattr(reward, "score"):
        return reward.score(images, prompts, check_finite)
    return reward(images, prompts), {}


def parse_spec(spec) -> dict[str, float] | None:
    """{name: weight} for a combination (a dict, or "a=1.0,b=0.5"; a bare name weighs 1); None for one reward name."""
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str) and ("=" in spec or "," in spec):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.rpartition("=") if "=" in part else (part, "", "1")
            items.append((name.strip(), w.strip()))
    else:
        return None
    weights: dict[str, float] = {}
    for name, w in items:
        try:
            w = math.nan if isinstance(w, bool) else float(w)
        except (TypeError, ValueError):
            w = math.nan
        if not name or not math.isfinite(w):
            raise UserError(f"reward spec {spec!r}: write name=weight pairs with finite numbers, e.g. 'hpsv2.1=1.0,pickscore=0.5'")
        if name in weights:
            raise UserError(f"reward spec {spec!r} names {name!r} twice")
        weights[name] = w
    if not weights:
        raise UserError(f"reward spec {spec!r} names no reward")
    return weights


def _load_one(fn: str, path) -> CheckedReward:
    if fn in BUILTIN:
        return CheckedReward(BUILTIN[fn](path), fn)
    if ":" not in fn:
        hint = difflib.get_close_matches(fn, list(BUILTIN), n=1)
        raise UserError(f"unknown reward {fn!r}; built-ins: {', '.join(BUILTIN)}, or name your own as 'module:callable' or 'file.py:callable'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return CheckedReward(_import_callable(fn), fn)


def load_reward(fn: str | dict, path: str | dict | None = None) -> CheckedReward:
    """The reward named by `fn` (see module docstring), checked on every call.

    `path` locates a built-in's weights (see builtin.py). For a combination it is a {name: path}
    dict, or one folder holding a subfolder per reward (like $LEAPALIGN_REWARD_DIR).
    """
    weights = parse_spec(fn)
    if weights is None:
        return _load_one(fn, path)
    if isinstance(path, dict):
        paths = {name: path.get(name) for name in weights}
    else:
        paths = {name: (str(Path(path) / name) if path and name in BUILTIN else None) for name in weights}
    parts = {name: (w, _load_one(name, paths[name])) for name, w in weights.items()}
    label = ",".join(f"{n}={w:g}" for n, w in weights.items())
    return CheckedReward(WeightedReward(parts), label)
