"""Judges: what a run is checked against but never trained on, so that reward hacking shows.

A judge is evaluated on the held-out prompts at `before`, every `eval.every` steps and `after`.  It is either
any reward name (`load_reward`: its mean over the images is its value; e.g. train on HPSv2.1, judge with
PickScore and ImageReward) or a registered checker returning {"overall": float, <part>: float, ...} (ShapeEval,
per task tag).  A prompt set may register its default judges (ShapeWorld: ShapeEval and ShapeScore).

`HackWatch` compares the training reward's held-out value with every judge across evaluations: when the
reward keeps rising while a judge falls by more than `eval.hack_margin`, the run says so in one line.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch

from .errors import UserError
from .evaluation import reward_values
from .rewards import BUILTIN, load_reward, parse_spec

Checker = Callable[[torch.Tensor, list], dict]


# name -> factory() of a checker; prompt-set prefix -> its default judges.  Plug-ins fill both (ShapeWorld: shapeeval)
CHECKERS: dict[str, Callable[[], Checker]] = {}
DEFAULTS: dict[str, list[str]] = {}


def register_checker(name: str, factory: Callable[[], Checker]) -> None:
    """Make `name` usable in eval.judges: factory() returns checker(images, prompts) -> {"overall": ..., ...}."""
    CHECKERS[name] = factory


def default_judges(prompts: str) -> list[str]:
    """The judges a prompt set asks for by default (eval.judges unset): ShapeWorld's two, none for a text file."""
    return next((names for prefix, names in DEFAULTS.items() if prompts.startswith(prefix)), [])


class Judges:
    """The run's judges by name; `__call__` scores images into {name: value or {part: value}}."""

    def __init__(self, names: list[str], exclude: str | None = None):
        self.fns: dict[str, Callable] = {}
        for name in names:
            if name == exclude:
                continue  # the training reward is reported as "reward" already
            if name in CHECKERS:
                self.fns[name] = CHECKERS[name]()
            elif name in BUILTIN or ":" in name or parse_spec(name) is not None:
                self.fns[name] = load_reward(name)
            else:
                hint = difflib.get_close_matches(name, [*CHECKERS, *BUILTIN], n=1)
                raise UserError(f"unknown judge {name!r} in eval.judges; judges are checkers ({', '.join(CHECKERS)}) or any reward "
                                f"({', '.join(BUILTIN)}, 'module:callable', 'file.py:callable')" + (f"; did you mean '{hint[0]}'?" if hint else ""))

    def to(self, device) -> "Judges":
        for fn in self.fns.values():
            if hasattr(fn, "to"):
                fn.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        return {name: fn(images, prompts) if name in CHECKERS else reward_values(fn, images, prompts).mean().item()
                for name, fn in self.fns.items()}


def headline(value) -> float:
    """A judge's one number: a reward's mean, a checker's "overall"."""
    return float(value["overall"]) if isinstance(value, dict) else float(value)


class HackWatch:
    """Warns when the held-out reward keeps rising while a judge falls.

    Over the last two evaluations (three points; the final one may use two when a run evaluates only before
    and after): the reward rose at each, and the judge's headline fell by more than `margin` in all.  Each
    judge warns once.
    """

    def __init__(self, margin: float):
        self.margin = margin
        self.history: list[dict] = []
        self.warned: set[str] = set()

    def update(self, step: int, result: dict, final: bool = False) -> list[str]:
        """Add one evaluation ({"reward", "judges"}); returns the new warning lines."""
        self.history.append({"step": step, "reward": result.get("reward"),
                             "judges": {n: headline(v) for n, v in result.get("judges", {}).items()}})
        window = self.history[-3:]
        if len(window) < (2 if final else 3) or any(e["reward"] is None for e in window):
            return []
        rewards = [e["reward"] for e in window]
        if not all(b > a for a, b in zip(rewards, rewards[1:])):
            return []
        lines = []
        for name in window[-1]["judges"]:
            if name in self.warned or any(name not in e["judges"] for e in window):
                continue
            first, last = window[0]["judges"][name], window[-1]["judges"][name]
            if first - last > self.margin:
                self.warned.add(name)
                lines.append(f"warning: reward hacking? from step {window[0]['step']} to {step} the held-out reward rose "
                             f"{rewards[0]:.4f} -> {rewards[-1]:.4f} while judge {name} fell {first:.4f} -> {last:.4f} "
                             f"(more than eval.hack_margin={self.margin})")
        return lines
