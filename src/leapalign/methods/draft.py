"""DRaFT (Clark et al. 2024): truncated back-propagation through the end of the rollout.

DRaFT-K re-runs the last K steps chained with gradient from sg(x_{N-K}) and connects the chain's
endpoint to the real x_N.  DRaFT-LV (K = 1) re-noises the real sample n times to the last step's sigma s,
    x' = (1 - s) sg(x_N) + s eps,   x0hat = x' + (0 - s) v(x', s),
and averages the rewards of the n predictions together with DRaFT-1's own (the last step re-run with
gradient, value x_N): n = 2, as the paper; the mean of the n + 1 terms as the reference code that carries
it (FlowBP's flux1/draft_lv.py, `num_noised_samples: 2`, one batch mean over base and copies).
`method.include_base=false` leaves the n re-noised predictions only (their mean; a sum is reward.scale x n).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .. import schedule
from ..backbones.base import Backbone
from ..rollout import Trajectory
from .base import Method, Surrogate, check_steps
from .refl import predict_sample


def chain_surrogate(backbone: Backbone, traj: Trajectory, num: int, checkpointing: bool = False) -> Surrogate:
    """Euler steps N-num ... N-1 with full gradient from sg(x_{N-num}); value connected to the real x_N.

    A step whose call the rollout kept (`chain_steps`) uses it, the chain's gradient passed through to its input."""
    n = traj.num_steps
    check_steps(num, n)
    s, cond = traj.sigmas, traj.cond
    x = traj.states[n - num].detach()
    for i in range(n - num, n):
        if i in traj.graphs:
            v = traj.velocity(backbone, i, x)
        elif checkpointing:
            v = checkpoint(backbone.velocity, x, s[i], cond, use_reentrant=False)
        else:
            v = backbone.velocity(x, s[i], cond)
        x = schedule.euler_step(x, v, s[i], s[i + 1])
    w = torch.ones(x.shape[0], device=x.device)
    return Surrogate(schedule.connect(x, traj.sample), w, True, {"k": n - num, "K": num})


def chain_steps(num: int, num_steps: int) -> set[int]:
    """The steps whose calls a chain of the last `num` steps back-propagates (what the rollout can keep for it)."""
    return set(range(num_steps - min(num, num_steps), num_steps))


def renoise(x_n: torch.Tensor, s: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x' = (1 - s) sg(x_N) + s eps with eps ~ N(0, I) from `generator` (on the generator's device)."""
    eps = torch.randn(x_n.shape, generator=generator, device=generator.device).to(x_n.device)
    return ((1 - s) * x_n.detach().float() + s * eps).to(x_n.dtype)


def lv_surrogate(backbone: Backbone, traj: Trajectory, x_noisy: torch.Tensor) -> Surrogate:
    """One re-noised draw (already without gradient to the sample), scored itself; its prediction in float32."""
    i = traj.num_steps - 1
    x0hat = predict_sample(backbone, traj, x_noisy, i)
    return Surrogate(x0hat, torch.ones(x0hat.shape[0], device=x0hat.device), False, {"k": i})


@dataclass
class DraftK(Method):
    """Options: k (how many final steps carry gradient), checkpointing (recompute each model call in backward)."""

    k: int = 1
    checkpointing: bool = False
    name = "draft_k"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"method.k must be >= 1, got {self.k}")

    @property
    def checkpoint_kept_calls(self) -> bool:
        return self.checkpointing

    def check(self, num_steps):
        check_steps(self.k, num_steps)

    def rollout_graphs(self, num_steps, generator):
        return chain_steps(self.k, num_steps)

    def surrogates(self, backbone, traj, generator):
        yield chain_surrogate(backbone, traj, self.k, self.checkpointing)


@dataclass
class DraftLV(Method):
    """Options: n (re-noised copies of the sample per rollout), include_base (DRaFT-1's own term in the mean)."""

    n: int = 2
    include_base: bool = True
    name = "draft_lv"

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"method.n must be >= 1, got {self.n}")

    @property
    def reward_on_sample(self) -> bool:  # DRaFT-1's term reuses the reward gradient at the real sample
        return self.include_base

    @property
    def surrogates_per_rollout(self) -> int:
        return self.n + int(self.include_base)

    def rollout_graphs(self, num_steps, generator):
        return chain_steps(1, num_steps) if self.include_base else set()

    def surrogates(self, backbone, traj, generator):
        if self.include_base:
            yield chain_surrogate(backbone, traj, 1)
        s = traj.sigmas[traj.num_steps - 1]
        for _ in range(self.n):
            yield lv_surrogate(backbone, traj, renoise(traj.sample, s, generator))
