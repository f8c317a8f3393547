"""FlowBP-Sparse (arXiv 2606.11075): x_N rebuilt as x_0 plus the Euler increments, K of them re-run with gradient.

    xhat_N = x_0 + sum_i (sigma_{i+1} - sigma_i) v_i,   v_i = v(sg(x_i), sigma_i) if i is active else cached v_i
    xt_N   = xhat_N + sg(x_N - xhat_N)                  (value = real sample)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..backbones.base import Backbone
from ..rollout import Trajectory
from .base import Method, Surrogate, check_steps


def flowbp_surrogate(backbone: Backbone, traj: Trajectory, active: list[int]) -> Surrogate:
    if traj.velocities is None:
        raise ValueError("flowbp_sparse needs the rollout's velocities: roll out with keep_velocities=True")
    x, s, cond = traj.states, traj.sigmas, traj.cond
    pred = x[0].float()
    for i in range(traj.num_steps):
        v = backbone.velocity(x[i].detach(), s[i], cond) if i in active else traj.velocities[i]
        pred = pred + (s[i + 1] - s[i]) * v
    w = torch.ones(pred.shape[0], device=pred.device)
    return Surrogate(schedule.connect(pred, traj.sample).to(traj.sample.dtype), w, True, {"k": list(active)})


@dataclass
class FlowBPSparse(Method):
    """Options: k (active steps, drawn without replacement uniformly over the rollout)."""

    k: int = 2
    name = "flowbp_sparse"
    needs_velocities = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1, got {self.k}")

    def check(self, num_steps):
        check_steps(self.k, num_steps)

    def surrogates(self, backbone, traj, generator):
        n = traj.num_steps
        self.check(n)
        yield flowbp_surrogate(backbone, traj, sorted(torch.randperm(n, generator=generator)[: self.k].tolist()))
