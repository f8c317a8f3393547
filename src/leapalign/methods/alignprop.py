"""AlignProp (Prabhudesai et al. 2023): full back-propagation through the last K steps of the rollout.

Default as AlignProp's code (config/alignprop_config.py, `backprop_strategy: 'gaussian'`, mean 42, std 5 of 50
DDIM steps): the step t where gradient starts is drawn once per rollout from a normal of mean 0.84 N and
standard deviation 0.1 N, redrawn until 1 <= t <= N - 1, and the last K = N - t steps carry gradient (about 8
of 50). `method.truncation=uniform` draws K uniformly in [min_k, max_k] instead (max_k null = the whole rollout).
The paper's first code redrew the cut at every step; that variant is not reproduced.

Memory grows with K (one checkpointed model call per step): the reference that shows why LeapAlign exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from .draft import chain_steps, chain_surrogate

TRUNCATIONS = ("gaussian", "uniform")


def gaussian_k(num_steps: int, mean: float, std: float, generator: torch.Generator) -> int:
    """K = N - t with t = int(Normal(mean N, std N)) redrawn until 1 <= t <= N - 1 (AlignProp's rejection loop)."""
    if num_steps < 2:
        return num_steps
    for _ in range(10_000):
        t = int(torch.normal(mean * num_steps, std * num_steps, (1,), generator=generator).item())
        if 1 <= t <= num_steps - 1:
            return num_steps - t
    raise ValueError(f"method.mean {mean} / method.std {std} never give a start step inside a {num_steps}-step rollout")


@dataclass
class AlignProp(Method):
    """Options: truncation (gaussian | uniform), mean and std (gaussian: where gradient starts, as fractions of the
    rollout), min_k and max_k (uniform: the range of K; max_k null = the whole rollout), checkpointing (per model call)."""

    truncation: str = "gaussian"
    mean: float = 0.84
    std: float = 0.1
    min_k: int = 1
    max_k: int | None = None
    checkpointing: bool = True
    name = "alignprop"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"method.truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")
        if not 0.0 < self.mean < 1.0 or self.std < 0:
            raise ValueError(f"method.mean must be in (0, 1) and method.std >= 0, got {self.mean}, {self.std}")
        if self.max_k is not None and self.max_k < 1:
            raise ValueError(f"method.max_k must be >= 1 or null, got {self.max_k}")
        if self.min_k < 1 or (self.max_k is not None and self.min_k > self.max_k):
            raise ValueError(f"method.min_k must be >= 1 and <= method.max_k, got {self.min_k}")

    def draw_k(self, num_steps: int, generator: torch.Generator) -> int:
        if self.truncation == "gaussian":
            return gaussian_k(num_steps, self.mean, self.std, generator)
        top = min(self.max_k or num_steps, num_steps)
        return int(torch.randint(min(self.min_k, top), top + 1, (1,), generator=generator))

    @property
    def checkpoint_kept_calls(self) -> bool:
        return self.checkpointing

    def rollout_graphs(self, num_steps, generator):
        return chain_steps(self.draw_k(num_steps, generator), num_steps)

    def surrogates(self, backbone, traj, generator):
        yield chain_surrogate(backbone, traj, self.draw_k(traj.num_steps, generator), self.checkpointing)
