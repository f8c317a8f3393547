"""Rewards are plug-ins: any callable (images (B,3,H,W) in [0,1], prompts) -> (B,) differentiable in images.

`reward.fn` names one: a built-in ("shapescore"), "package.module:callable", or
"path/to/file.py:callable".  A class is instantiated with no arguments.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError

RewardFn = Callable[[torch.Tensor, list], torch.Tensor]


def _shapescore(path: str | None = None) -> RewardFn:
    from ..shapeworld import load_reward

    return load_reward(path)


BUILTIN: dict[str, Callable[..., RewardFn]] = {"shapescore": _shapescore}


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
    """Wraps a reward so a wrong shape or a non-finite value is a clear error, not a silent NaN."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = self.fn(images, prompts)
        if not isinstance(out, torch.Tensor) or out.shape != (len(prompts),):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"reward {self.name} returned {shape}; a reward must return a tensor of shape ({len(prompts)},), one value per image")
        if not torch.isfinite(out).all():
            raise UserError(f"reward {self.name} returned non-finite values {out.detach().cpu().tolist()}")
        return out

    def to(self, device):
        if hasattr(self.fn, "to"):
            self.fn.to(device)
        return self


def load_reward(fn: str, path: str | None = None) -> CheckedReward:
    """The reward named by `fn` (see module docstring), checked on every call."""
    if fn in BUILTIN:
        return CheckedReward(BUILTIN[fn](path), fn)
    if ":" not in fn:
        hint = difflib.get_close_matches(fn, list(BUILTIN), n=1)
        raise UserError(f"unknown reward {fn!r}; built-ins: {', '.join(BUILTIN)}, or name your own as 'module:callable' or 'file.py:callable'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    return CheckedReward(_import_callable(fn), fn)
