"""LeapAlign (CVPR 2026): two leaps, k -> j -> N, whose gradient reaches any step at the cost of two model calls.

    xhat_j = x_k + (sigma_j - sigma_k) v(sg(x_k), sigma_k)
    xt_j   = xhat_j + sg(x_j - xhat_j)
    xin_j  = alpha xt_j + (1 - alpha) sg(xt_j)
    xhat_N = xt_j + (0 - sigma_j) v(xin_j, sigma_j)
    xt_N   = xhat_N + sg(x_N - xhat_N)
    w      = 1 / (max(mean|xhat_j - x_j|, tau) + max(mean|xhat_N - x_N|, tau))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..backbones.base import Backbone
from ..rollout import Trajectory
from ..errors import UserError
from .base import Method, Surrogate


def sample_pairs(num_steps: int, count: int, generator: torch.Generator, window: tuple[float, float] = (0.0, 1.0),
                 fixed_gap: int | None = None) -> list[tuple[int, int]]:
    """`count` pairs k < j drawn uniformly over the distinct step pairs inside the window.

    Steps are 0 ... N-1 (the ones where the model is evaluated); the window is a fraction of
    the rollout, e.g. (0.5, 1.0) for the late half.  With `fixed_gap`, j = k + gap.
    """
    lo = int(round(window[0] * num_steps))
    hi = int(round(window[1] * num_steps))
    steps = list(range(lo, hi))
    if fixed_gap is not None:
        pairs = [(k, k + fixed_gap) for k in steps if k + fixed_gap in steps]
    else:
        pairs = [(k, j) for k in steps for j in steps if k < j]
    if not pairs:
        raise ValueError(f"no step pairs in window {window} of a {num_steps}-step rollout; widen method.window or lower method.fixed_gap")
    idx = torch.randint(len(pairs), (count,), generator=generator).tolist()
    return [pairs[i] for i in idx]


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |a - b| in float64: the weight's distances, exact whatever the model dtype."""
    return (a.double() - b.double()).abs().flatten(1).mean(1)


def leap_surrogate(backbone: Backbone, traj: Trajectory, k: int, j: int, alpha: float, tau: float, weighting: bool) -> Surrogate:
    """One LeapAlign surrogate for the pair (k, j): value x_N, gradient through both leaps.

    Leaps and connectors are float32 whatever the model dtype (only the model's input is cast to
    it), so a bf16 model's long leaps are not rounded to 8 bits; the endpoint is float32.
    """
    x, s = traj.states, traj.sigmas
    x_k, x_j, x_n = x[k], x[j].float(), x[-1].float()
    xhat_j = x_k.float() + (s[j] - s[k]) * traj.velocity(backbone, k).float()  # v(sg(x_k)); the rollout's own call if kept
    xt_j = schedule.connect(xhat_j, x_j)
    xin_j = schedule.discount(xt_j, alpha).to(x_k.dtype)
    xhat_n = xt_j + (s[-1] - s[j]) * traj.velocity(backbone, j, xin_j).float()  # value v(x_j), gradient through xin_j
    xt_n = schedule.connect(xhat_n, x_n)
    with torch.no_grad():
        d_j, d_n = _mean_abs(xhat_j, x_j), _mean_abs(xhat_n, x_n)
        w = 1.0 / (d_j.clamp(min=tau) + d_n.clamp(min=tau)) if weighting else torch.ones_like(d_j)
    return Surrogate(xt_n, w.float(), True, {"k": k, "j": j, "d_j": d_j.mean().detach(), "d_N": d_n.mean().detach(),
                                         "weight": w.mean().detach()})


@dataclass
class LeapAlign(Method):
    """Options: alpha (gradient discount of the nested term), tau (similarity floor), weighting,
    pairs_per_rollout (M surrogates sharing one reward gradient), window, fixed_gap."""

    alpha: float = 0.3
    tau: float = 0.1
    weighting: bool = True
    pairs_per_rollout: int = 1
    window: tuple[float, float] = (0.0, 1.0)
    fixed_gap: int | None = None
    name = "leapalign"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"method.tau must be positive, got {self.tau}")
        if self.pairs_per_rollout < 1:
            raise ValueError(f"method.pairs_per_rollout must be >= 1, got {self.pairs_per_rollout}")
        lo, hi = self.window
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"method.window must satisfy 0 <= start < end <= 1, got {list(self.window)}")
        if self.fixed_gap is not None and self.fixed_gap < 1:
            raise ValueError(f"method.fixed_gap must be >= 1 or null, got {self.fixed_gap}")

    def check(self, num_steps):
        try:
            sample_pairs(num_steps, 0, torch.Generator(), tuple(self.window), self.fixed_gap)
        except ValueError as e:
            raise UserError(str(e)) from None

    @property
    def surrogates_per_rollout(self) -> int:
        return self.pairs_per_rollout

    def rollout_graphs(self, num_steps, generator):
        return {i for pair in self._pairs(num_steps, generator) for i in pair}

    def _pairs(self, num_steps, generator):
        return sample_pairs(num_steps, self.pairs_per_rollout, generator, tuple(self.window), self.fixed_gap)

    def surrogates(self, backbone, traj, generator):
        for k, j in self._pairs(traj.num_steps, generator):
            yield leap_surrogate(backbone, traj, k, j, self.alpha, self.tau, self.weighting)
