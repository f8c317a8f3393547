"""ReFL (Xu et al. 2023, ImageReward): one model call with gradient at a late step t, reward on its one-step prediction.

    x0hat = x_t + (0 - sigma_t) v(sg(x_t), sigma_t)        (not connected: the reward sees x0hat)

Default as ImageReward's own ReFL.py: t uniform over the last quarter of the rollout (`random.randint(30, 39)`
of 40 steps). The LeapAlign / FlowBP comparisons draw t from the last 11 of 25 steps: `method.window=[0.56,1]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def predict_sample(backbone: Backbone, traj: Trajectory, x_t: torch.Tensor, t: int, v: torch.Tensor | None = None) -> torch.Tensor:
    """x0hat = x_t + (0 - sigma_t) v(sg(x_t), sigma_t) in float32 (the reference codes' prediction), gradient through v
    (`v`: that velocity already computed, e.g. the rollout's own call)."""
    s = traj.sigmas
    v = backbone.velocity(x_t.detach(), s[t], traj.cond) if v is None else v
    return x_t.float() + (s[-1] - s[t]) * v.float()


def refl_surrogate(backbone: Backbone, traj: Trajectory, t: int) -> Surrogate:
    x0hat = predict_sample(backbone, traj, traj.states[t], t, traj.velocity(backbone, t))
    return Surrogate(x0hat, torch.ones(x0hat.shape[0], device=x0hat.device), False, {"k": t})


@dataclass
class ReFL(Method):
    """Options: window (fraction of the rollout the step t is drawn from, uniformly)."""

    window: tuple[float, float] = (0.75, 1.0)  # ImageReward's ReFL: the last 10 of 40 steps
    name = "refl"

    def __post_init__(self):
        check_window(self.window, "window")

    reward_on_sample = False

    def check(self, num_steps):
        window_steps(num_steps, tuple(self.window))

    def _step(self, num_steps, generator):
        return pick(window_steps(num_steps, tuple(self.window)), generator)

    def rollout_graphs(self, num_steps, generator):
        return {self._step(num_steps, generator)}

    def surrogates(self, backbone, traj, generator):
        yield refl_surrogate(backbone, traj, self._step(traj.num_steps, generator))
