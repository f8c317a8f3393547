"""ReFL (ImageReward): one model call with gradient at a late step t, reward on its one-step prediction.

    x0hat = x_t + (0 - sigma_t) v(sg(x_t), sigma_t)        (not connected: the reward sees x0hat)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..backbones.base import Backbone
from ..errors import UserError
from ..rollout import Trajectory
from .base import Method, Surrogate


def check_window(window: tuple[float, float], option: str) -> None:
    lo, hi = window
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"method.{option} must satisfy 0 <= start < end <= 1, got {list(window)}")


def window_steps(num_steps: int, window: tuple[float, float], option: str = "window") -> list[int]:
    """Model-call steps 0 ... N-1 inside a fraction of the rollout, e.g. (0.5, 1.0) = the late half."""
    steps = list(range(int(round(window[0] * num_steps)), int(round(window[1] * num_steps))))
    if not steps:
        raise UserError(f"no step in method.{option} {list(window)} of a {num_steps}-step rollout; widen method.{option}")
    return steps


def pick(steps: list[int], generator: torch.Generator) -> int:
    return steps[int(torch.randint(len(steps), (1,), generator=generator))]


def refl_surrogate(backbone: Backbone, traj: Trajectory, t: int) -> Surrogate:
    x_t, s = traj.states[t], traj.sigmas
    x0hat = schedule.leap(x_t, backbone.velocity(x_t.detach(), s[t], traj.cond), s[t], s[-1])
    return Surrogate(x0hat, torch.ones(x_t.shape[0], device=x_t.device), False, {"k": t})


@dataclass
class ReFL(Method):
    """Options: window (fraction of the rollout the step t is drawn from, uniformly)."""

    window: tuple[float, float] = (0.5, 1.0)
    name = "refl"

    def __post_init__(self):
        check_window(self.window, "window")

    reward_on_sample = False

    def check(self, num_steps):
        window_steps(num_steps, tuple(self.window))

    def surrogates(self, backbone, traj, generator):
        yield refl_surrogate(backbone, traj, pick(window_steps(traj.num_steps, tuple(self.window)), generator))
