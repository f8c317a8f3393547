"""FlowBP-Sparse (arXiv 2606.11075): x_N rebuilt as x_0 plus the Euler increments, K of them re-run with gradient.

    xhat_N = x_0 + sum_i (sigma_{i+1} - sigma_i) v_i,   v_i = sg(v) + g (v - sg(v)), v = v(sg(x_i), sigma_i) if i is active,
                                                       else the cached v_i
    g      = 1 + rho (sum_i |sigma_{i+1} - sigma_i| / sum_{i active} |sigma_{i+1} - sigma_i| - 1)   (backward only)
    xt_N   = xhat_N + sg(x_N - xhat_N)                  (value = real sample)

Defaults as the reference code (FlowBP's flux1/flowbp_sparse.py and its FLUX.1 config): K = 3 active steps
drawn without replacement with probability proportional to (i + 1)^late_bias, late_bias 2, and the active
increments' gradient rescaled to the whole rollout's sigma span (grad_rescale rho = 1). Composition in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..backbones.base import Backbone
from ..rollout import Trajectory
from .base import Method, Surrogate, check_steps


def late_biased_steps(num_steps: int, k: int, late_bias: float, generator: torch.Generator) -> list[int]:
    """k distinct steps of 0 ... N-1, P(i) proportional to (i + 1)^late_bias (0 = uniform), sorted."""
    weights = torch.arange(1, num_steps + 1, dtype=torch.float64) ** late_bias
    return sorted(torch.multinomial(weights, k, replacement=False, generator=generator).tolist())


def flowbp_surrogate(backbone: Backbone, traj: Trajectory, active: list[int], grad_rescale: float = 0.0) -> Surrogate:
    if traj.velocities is None:
        raise ValueError("flowbp_sparse needs the rollout's velocities: roll out with keep_velocities=True")
    x, s, cond = traj.states, traj.sigmas, traj.cond
    dt = [(s[i + 1] - s[i]) for i in range(traj.num_steps)]
    span = sum(abs(float(d)) for d in dt) / max(sum(abs(float(dt[i])) for i in active), 1e-12)
    g = 1.0 + grad_rescale * (span - 1.0)
    pred = x[0].float()
    for i in range(traj.num_steps):
        if i in active:
            v = backbone.velocity(x[i].detach(), s[i], cond).float()
            v = v if g == 1.0 else v.detach() + g * (v - v.detach())
        else:
            v = traj.velocities[i].float()
        pred = pred + dt[i] * v
    w = torch.ones(pred.shape[0], device=pred.device)
    return Surrogate(schedule.connect(pred, traj.sample.float()), w, True, {"k": list(active)})


@dataclass
class FlowBPSparse(Method):
    """Options: k (active steps), late_bias (their draw weights (i + 1)^late_bias), grad_rescale (rho above; 0 = raw)."""

    k: int = 3
    late_bias: float = 2.0
    grad_rescale: float = 1.0
    name = "flowbp_sparse"
    needs_velocities = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1, got {self.k}")
        if self.late_bias < 0 or self.grad_rescale < 0:
            raise ValueError(f"method.late_bias and method.grad_rescale must be >= 0, got {self.late_bias}, {self.grad_rescale}")

    def check(self, num_steps):
        check_steps(self.k, num_steps)

    def surrogates(self, backbone, traj, generator):
        self.check(traj.num_steps)
        active = late_biased_steps(traj.num_steps, self.k, self.late_bias, generator)
        yield flowbp_surrogate(backbone, traj, active, self.grad_rescale)
