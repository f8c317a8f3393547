"""Stage 1 of every method: sample the whole trajectory without gradient and keep its states."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

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
    graphs: dict = field(default_factory=dict)  # step -> (input leaf, velocity with its graph): calls the rollout kept

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def velocity(self, backbone: Backbone, i: int, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """v(x_i, sigma_i) with its graph to the parameters: the rollout's own call where it kept one (each once), else a new one.

        `x_in`: an input whose value is x_i and through which the gradient must also flow (LeapAlign's second
        leap); by default the input is sg(x_i).  Reusing the rollout's call saves a forward and gives the same value.
        """
        kept = self.graphs.pop(i, None)
        if kept is None:
            return backbone.velocity(self.states[i].detach() if x_in is None else x_in, self.sigmas[i], self.cond)
        if x_in is None or not x_in.requires_grad:
            return kept[1]
        return _ThroughKept.apply(x_in, kept)

    @property
    def sample(self) -> torch.Tensor:
        return self.states[-1]


class _ThroughKept(torch.autograd.Function):
    """Output: a kept call's velocity; backward: runs the kept graph (into the parameters and its input leaf) and
    passes the leaf's gradient on to `x_in`, as if the call had been made on x_in (the pattern of reentrant checkpointing)."""

    @staticmethod
    def forward(ctx, x_in, kept):
        ctx.kept = kept
        return kept[1].detach()

    @staticmethod
    def backward(ctx, grad):
        leaf, v = ctx.kept
        torch.autograd.backward(v, grad)
        g, leaf.grad = leaf.grad, None
        return g, None


@torch.no_grad()
def rollout(backbone: Backbone, prompts: list[str], num_steps: int, height: int, width: int,
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            keep_velocities: bool = False, progress: bool = False, keep_graphs=(), checkpoint_kept: bool = False) -> Trajectory:
    """Euler sampling exactly as the backbone's diffusers pipeline does it, recording every state.

    `keep_graphs`: steps whose model call is made with gradient and kept (`Trajectory.velocity` hands it to the
    surrogate that needs it): a forward saved per reused call, their activations held until the step's backward.
    `checkpoint_kept`: those calls hold only their inputs and recompute their activations in the backward (a chain
    of K calls, as AlignProp's, then holds K inputs instead of K calls' activations; the forward is still saved).
    """
    call = partial(checkpoint, backbone.velocity, use_reentrant=False) if checkpoint_kept else backbone.velocity
    cond = backbone.at_resolution(backbone.encode_prompts(prompts), height, width)
    x = noise if noise is not None else backbone.initial_noise(len(prompts), height, width, generator)
    sigmas = backbone.sigmas(num_steps, height, width)
    states, velocities, graphs = [x], [], {}
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rollout", leave=False)
    for i in steps:
        if i in keep_graphs:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                graphs[i] = (leaf, call(leaf, sigmas[i], cond))
            v = graphs[i][1].detach()
        else:
            v = backbone.velocity(x, sigmas[i], cond)
        if keep_velocities:
            velocities.append(v)
        x = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
        states.append(x)
    return Trajectory(torch.stack(states), sigmas, cond, list(prompts), height, width,
                      torch.stack(velocities) if keep_velocities else None, graphs)
