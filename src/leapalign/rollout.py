"""Stage 1 of every method: sample the whole trajectory without gradient and keep its states."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import schedule
from .backbones.base import Backbone, Conditioning


@dataclass
class Trajectory:
    """states[i] is x_i for i = 0 (noise) ... N (the real sample); sigmas[i] its noise level (sigmas[N] = 0)."""

    states: torch.Tensor  # (N + 1, B, ...)
    sigmas: torch.Tensor  # (N + 1,)
    cond: Conditioning
    prompts: list[str]
    height: int
    width: int
    velocities: torch.Tensor | None = None  # (N, B, ...) when kept

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def sample(self) -> torch.Tensor:
        return self.states[-1]


@torch.no_grad()
def rollout(backbone: Backbone, prompts: list[str], num_steps: int, height: int, width: int,
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            keep_velocities: bool = False, progress: bool = False) -> Trajectory:
    """Euler sampling exactly as the backbone's diffusers pipeline does it, recording every state."""
    cond = backbone.at_resolution(backbone.encode_prompts(prompts), height, width)
    x = noise if noise is not None else backbone.initial_noise(len(prompts), height, width, generator)
    sigmas = backbone.sigmas(num_steps, height, width)
    states, velocities = [x], []
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rollout", leave=False)
    for i in steps:
        v = backbone.velocity(x, sigmas[i], cond)
        if keep_velocities:
            velocities.append(v)
        x = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
        states.append(x)
    return Trajectory(torch.stack(states), sigmas, cond, list(prompts), height, width,
                      torch.stack(velocities) if keep_velocities else None)
