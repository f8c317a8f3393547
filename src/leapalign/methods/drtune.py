"""DRTune (Wu et al. 2024): stop-gradient model inputs, K trained steps, early stop at t_min and leap.

    t_min    uniform over the last 40% of the rollout (stop_window)
    trained  = K steps evenly spaced over 0 ... t_min (inclusive) with a random offset
    xt_tmin  = connect(x_tmin + sum_{i in trained, i < t_min} (sigma_{i+1} - sigma_i) v(sg(x_i), sigma_i), x_tmin)
    x0hat    = xt_tmin + (0 - sigma_tmin) v(sg(x_tmin), sigma_tmin)     (not connected; v with gradient only if t_min is trained)

Every model input is detached, so no Jacobian dv/dx is ever multiplied (LeapAlign's alpha = 0).
Defaults as the paper (K = 3 for a 25-step sampler, early stop m ~ 0.4 T) and the reference code that
carries it (FlowBP's flux1/drtune.py: `num_train_steps: 3`, `early_stop_ratio: 0.4`, stride (t_min + 1) // K,
random start). No official DRTune code is public. LeapAlign's paper reports K = 2 with t_min from the last 11
of 25 steps: `method.k=2 method.stop_window=[0.56,1]`; `method.train_stop=true` always trains t_min's velocity.
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
    """k steps of 0 ... t_min, stride (t_min + 1) // k, start uniform in [0, t_min - (k - 1) stride] (all if t_min < k)."""
    total = t_min + 1
    if total <= k:
        return list(range(total))
    stride = total // k
    start = int(torch.randint(total - (k - 1) * stride, (1,), generator=generator))
    return [start + i * stride for i in range(k)]


def graph_steps(trained: list[int], t_min: int, train_stop: bool) -> tuple[list[int], bool]:
    """The trained steps before t_min (their velocities carry gradient) and whether t_min's own velocity does."""
    return [i for i in trained if i < t_min], train_stop or t_min in trained


def drtune_surrogate(backbone: Backbone, traj: Trajectory, trained: list[int], t_min: int, train_stop: bool = False) -> Surrogate:
    x, s = traj.states, traj.sigmas
    x_t = x[t_min]
    pred = x_t.float()
    before, stop_trained = graph_steps(trained, t_min, train_stop)
    for i in before:
        pred = pred + (s[i + 1] - s[i]) * traj.velocity(backbone, i).float()
    xt = schedule.connect(pred, x_t.float())
    if stop_trained:
        v_stop = traj.velocity(backbone, t_min).float()
    else:
        with torch.no_grad():
            v_stop = backbone.velocity(x_t, s[t_min], traj.cond).float()
    x0hat = xt + (s[-1] - s[t_min]) * v_stop
    return Surrogate(x0hat, torch.ones(x_t.shape[0], device=x_t.device), False, {"k": list(trained), "j": t_min})


@dataclass
class DRTune(Method):
    """Options: k (trained steps over 0 ... t_min), stop_window (fraction of the rollout t_min is drawn from),
    train_stop (t_min's velocity always carries gradient; the reference trains it only when it is one of the k)."""

    k: int = 3
    stop_window: tuple[float, float] = (0.6, 1.0)  # the last 10 of 25 steps (early stop ratio 0.4)
    train_stop: bool = False
    name = "drtune"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1, got {self.k}")
        check_window(self.stop_window, "stop_window")

    reward_on_sample = False

    def check(self, num_steps):
        window_steps(num_steps, tuple(self.stop_window), "stop_window")

    def _draw(self, num_steps, generator):
        t_min = pick(window_steps(num_steps, tuple(self.stop_window), "stop_window"), generator)
        return spaced_steps(t_min, self.k, generator), t_min

    def rollout_graphs(self, num_steps, generator):
        trained, t_min = self._draw(num_steps, generator)
        before, stop_trained = graph_steps(trained, t_min, self.train_stop)
        return set(before) | ({t_min} if stop_trained else set())

    def surrogates(self, backbone, traj, generator):
        trained, t_min = self._draw(traj.num_steps, generator)
        yield drtune_surrogate(backbone, traj, trained, t_min, self.train_stop)
