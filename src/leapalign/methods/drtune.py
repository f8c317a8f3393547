"""DRTune (Wu et al. 2024): stop-gradient model inputs, K trained steps, early stop at t_min and leap.

    trained  = K steps evenly spaced over 0 ... t_min-1 with a random offset
    xt_tmin  = connect(x_tmin + sum_{i in trained} (sigma_{i+1} - sigma_i) v(sg(x_i), sigma_i), x_tmin)
    x0hat    = xt_tmin + (0 - sigma_tmin) v(sg(x_tmin), sigma_tmin)     (not connected)

Every model input is detached, so no Jacobian dv/dx is ever multiplied (LeapAlign's alpha = 0);
the leap's own velocity keeps its gradient, as in LeapAlign's second leap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..backbones.base import Backbone
from ..rollout import Trajectory
from .base import Method, Surrogate
from .refl import check_window, pick, window_steps


def spaced_steps(t_min: int, k: int, generator: torch.Generator) -> list[int]:
    """k steps of 0 ... t_min-1, every t_min // k with a random offset (all of them if t_min <= k)."""
    if t_min <= k:
        return list(range(t_min))
    gap = t_min // k
    offset = int(torch.randint(gap, (1,), generator=generator))
    return [offset + i * gap for i in range(k)]


def drtune_surrogate(backbone: Backbone, traj: Trajectory, trained: list[int], t_min: int) -> Surrogate:
    x, s, cond = traj.states, traj.sigmas, traj.cond
    x_t = x[t_min]
    pred = x_t.float()
    for i in trained:
        pred = pred + (s[i + 1] - s[i]) * backbone.velocity(x[i].detach(), s[i], cond)
    xt = schedule.connect(pred, x_t).to(x_t.dtype)
    x0hat = schedule.leap(xt, backbone.velocity(x_t.detach(), s[t_min], cond), s[t_min], s[-1])
    return Surrogate(x0hat, torch.ones(x_t.shape[0], device=x_t.device), False, {"k": list(trained), "j": t_min})


@dataclass
class DRTune(Method):
    """Options: k (trained steps before t_min), stop_window (fraction of the rollout t_min is drawn from)."""

    k: int = 2
    stop_window: tuple[float, float] = (0.56, 1.0)  # the last 11 of 25 steps, as in LeapAlign's comparison
    name = "drtune"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1, got {self.k}")
        check_window(self.stop_window, "stop_window")

    reward_on_sample = False

    def check(self, num_steps):
        window_steps(num_steps, tuple(self.stop_window), "stop_window")

    def surrogates(self, backbone, traj, generator):
        t_min = pick(window_steps(traj.num_steps, tuple(self.stop_window), "stop_window"), generator)
        yield drtune_surrogate(backbone, traj, spaced_steps(t_min, self.k, generator), t_min)
