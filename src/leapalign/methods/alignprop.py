"""AlignProp (Prabhudesai et al. 2023): full back-propagation through the last K steps, K random in [1, max_k].

Memory grows with K (one checkpointed model call per step): the reference that shows why LeapAlign exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from .draft import chain_surrogate


@dataclass
class AlignProp(Method):
    """Options: min_k, max_k (K is uniform in [min_k, max_k]; max_k null = the whole rollout), checkpointing (per model call)."""

    min_k: int = 1
    max_k: int | None = None
    checkpointing: bool = True
    name = "alignprop"

    def __post_init__(self):
        if self.max_k is not None and self.max_k < 1:
            raise ValueError(f"method.max_k must be >= 1 or null, got {self.max_k}")
        if self.min_k < 1 or (self.max_k is not None and self.min_k > self.max_k):
            raise ValueError(f"method.min_k must be >= 1 and <= method.max_k, got {self.min_k}")

    def surrogates(self, backbone, traj, generator):
        top = min(self.max_k or traj.num_steps, traj.num_steps)
        low = min(self.min_k, top)
        yield chain_surrogate(backbone, traj, int(torch.randint(low, top + 1, (1,), generator=generator)), self.checkpointing)
