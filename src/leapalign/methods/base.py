"""A method builds surrogates over a cached rollout; the trainer owns everything else."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones.base import Backbone
from ..errors import UserError
from ..rollout import Trajectory


@dataclass
class Surrogate:
    """A differentiable stand-in for the reward input.

    If `connected` the endpoint's value is the real sample x_N, so the trainer back-propagates
    the shared reward gradient dL/dx_N into it; otherwise the reward is evaluated on it directly.
    `weight` (B,) multiplies each sample's loss.
    """

    endpoint: torch.Tensor
    weight: torch.Tensor
    connected: bool = True
    info: dict = field(default_factory=dict)


def check_steps(k: int, num_steps: int) -> None:
    """`method.k` model calls with gradient must fit in the rollout."""
    if not 1 <= k <= num_steps:
        raise UserError(f"method.k = {k} exceeds the {num_steps} steps of the rollout; lower method.k or raise train.num_steps")


class Method:
    name = "base"
    needs_velocities = False  # True: the rollout keeps v_i of every step (traj.velocities)
    reward_on_sample = True  # False: every surrogate is scored itself, so dLoss/dx_N is not needed
    checkpoint_kept_calls = False  # True: the calls the rollout keeps for it recompute their activations in the backward

    @property
    def surrogates_per_rollout(self) -> int:
        """How many surrogates `surrogates` yields per rollout; the trainer averages them."""
        return 1

    def check(self, num_steps: int) -> None:
        """Raise UserError if the method cannot run on a rollout of num_steps steps (before any work)."""

    def rollout_graphs(self, num_steps: int, generator: torch.Generator) -> set[int]:
        """Steps whose model call (at the rollout's own input) the surrogates will back-propagate, drawn as `surrogates`
        will draw them from `generator` (a copy): the rollout keeps those calls instead of the surrogates repeating them.
        A method that fetches its calls with `Trajectory.velocity` may say which; the default keeps none."""
        return set()

    def surrogates(self, backbone: Backbone, traj: Trajectory, generator: torch.Generator):
        """Yield surrogates one at a time so each can be back-propagated and freed before the next."""
        raise NotImplementedError
