"""One training step's gradient over a rollout: the reward gradient once at the real sample, every
surrogate of the method back-propagated with it, and the velocity anchor.  The trainer and every
benchmark call `rollout_for` and `step`; the pieces are public for analyses that need them apart (per-sample gradients).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .methods import Method
from .rewards import scores
from .rollout import Trajectory, rollout


def hinge(r: torch.Tensor, lam: float, scale: float) -> torch.Tensor:
    """The per-sample loss max(0, lam - r) * scale: zero, and no gradient, for rewards above the margin."""
    return torch.relu(lam - r) * scale


def balance_rows(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient (row) rescaled to the mean norm of the non-zero rows; zero rows stay zero.

    A reward's slope differs by an order of magnitude between samples (a blank canvas against a near miss), so
    the batch's gradient points where its few steepest samples point; balanced, every sample's direction counts
    the same and the step keeps its size."""
    norms = grad.flatten(1).float().norm(dim=1)
    live = norms > 0
    if not bool(live.any()):
        return grad
    target = norms[live].mean()
    factor = torch.where(live, target / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return grad * factor.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1))


class _BalanceRows(torch.autograd.Function):
    """Identity forward; `balance_rows` on the gradient backward (for surrogates scored at their own endpoint)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return balance_rows(g)


@dataclass
class Objective:
    """What one step's gradient is made of besides the model: the method, the reward and its hinge, the anchor."""

    method: Method
    reward: Callable
    lam: float
    scale: float = 1.0
    anchor: float = 0.0  # beta of the velocity anchor; 0 = off
    anchor_base: object = None  # a backbone over a frozen copy (full fine-tuning); None = the model with its LoRA off
    decode_batch: int = 0  # decode and score this many samples at a time; 0 = all
    balance: bool = False  # every sample's reward gradient rescaled to the batch's mean norm (`balance_rows`)


@dataclass
class StepResult:
    """What a step reports.  The numbers stay on the device as 0-dim tensors (no GPU sync between the
    surrogates' backwards); the trainer reads them all at once after the step (`train.read_numbers`)."""

    rewards: torch.Tensor  # (B,) at the real samples, detached
    components: dict = field(default_factory=dict)  # {reward name: (B,)} of a weighted sum
    active: torch.Tensor | float = 0.0  # fraction of samples whose hinge is positive
    loss: torch.Tensor | float = math.nan  # the surrogates' weighted hinge loss, times the step's factor
    anchor: torch.Tensor | None = None
    infos: list = field(default_factory=list)  # one dict per surrogate (the method's own log fields, tensors or ints)
    bad: str | None = None  # "reward": non-finite, nothing back-propagated; "loss": the loss or anchor is


def rollout_for(backbone, method: Method, prompts: list[str], num_steps: int, height: int, width: int, noise: torch.Tensor,
                pair_generator: torch.Generator, reuse_calls: bool = True) -> Trajectory:
    """The rollout a step of `method` needs: its velocities if it reads them and, with `reuse_calls`, the model calls its
    surrogates will back-propagate (chosen from a copy of the generator, which `step` then draws from for real)."""
    keep = set()
    if reuse_calls:
        peek = torch.Generator(pair_generator.device)
        peek.set_state(pair_generator.get_state())
        keep = method.rollout_graphs(num_steps, peek)
    return rollout(backbone, prompts, num_steps, height, width, noise=noise, keep_velocities=method.needs_velocities, keep_graphs=keep,
                   checkpoint_kept=method.checkpoint_kept_calls)


def reward_gradient(backbone, reward, sample: torch.Tensor, prompts: list[str], height: int, width: int, lam: float, scale: float,
                    need_grad: bool = True, chunk: int = 0, balance: bool = False):
    """Decode the real sample once, score it, and return (rewards, per-sample hinge losses, dLoss_b/dx_N or None,
    the reward's components {name: (B,)}).

    `chunk` > 0 decodes and scores that many images at a time (the VAE's activations at full
    resolution are the biggest tensors of a step); a per-image reward gives the same result.
    `balance` rescales each sample's gradient to the batch's mean norm (`balance_rows`).
    """
    x = sample.detach().requires_grad_(need_grad)
    size = chunk if chunk > 0 else len(prompts)
    rs, grads, parts = [], [], {}
    for i in range(0, len(prompts), size):
        xi, pi = x[i : i + size], prompts[i : i + size]
        with torch.enable_grad() if need_grad else torch.no_grad():
            ri, components = scores(reward, backbone.decode(xi, height, width), pi)
            if need_grad:
                (gi,) = torch.autograd.grad(hinge(ri, lam, scale).sum(), x)
                grads.append(gi)
        rs.append(ri.detach())
        for name, values in components.items():
            parts.setdefault(name, []).append(values)
    r = torch.cat(rs)
    grad = None if not need_grad else (grads[0] if len(grads) == 1 else torch.stack(grads).sum(0))
    if grad is not None and balance:
        grad = balance_rows(grad)
    return r, hinge(r, lam, scale), grad, {k: torch.cat(v) for k, v in parts.items()}


def backward_surrogates(backbone, method, reward, traj, grad, losses, generator, lam: float, scale: float, factor: float = 1.0,
                        balance: bool = False):
    """Accumulate into .grad the gradient of factor * (mean over the method's surrogates of the batch-mean weighted loss).

    A connected surrogate reuses the rollout's reward gradient `grad`; an unconnected one (a
    prediction, e.g. ReFL) is decoded and scored itself, its gradient at the endpoint balanced when `balance`
    is set (as `reward_gradient` balances the connected ones').  Returns (loss value as a 0-dim tensor, surrogate infos).
    """
    B, H, W = traj.sample.shape[0], traj.height, traj.width
    m = method.surrogates_per_rollout
    # each surrogate's backward is scaled by 1/M up front: the accumulated .grad is the mean directly
    # (no in-place fix-up afterwards, which a sharded model's deferred gradient reduction would miss)
    factor = factor / m
    loss, infos = torch.zeros((), device=traj.sample.device), []
    for s in method.surrogates(backbone, traj, generator):
        infos.append(s.info)
        if len(infos) > m:  # before its backward: a miscounted method must not leave wrong gradients behind
            raise RuntimeError(f"{method.name} yielded more surrogates than its surrogates_per_rollout = {m}")
        w = s.weight.float()  # the similarity weight keeps float32 whatever the model dtype
        if s.connected:
            if grad is None:
                raise RuntimeError(f"{method.name} yielded a connected surrogate but declares reward_on_sample = False")
            coeff = (w * factor / B).view(-1, *[1] * (grad.dim() - 1))
            torch.autograd.backward(s.endpoint, grad_tensors=(grad * coeff).to(s.endpoint.dtype))
            loss += (w * losses).mean().detach() * factor
        else:
            endpoint = _BalanceRows.apply(s.endpoint) if balance else s.endpoint
            pl = hinge(scores(reward, backbone.decode(endpoint, H, W), traj.prompts)[0], lam, scale)
            ((w * pl).mean() * factor).backward()
            loss += (w * pl.detach()).mean() * factor
    if len(infos) != m:
        raise RuntimeError(f"{method.name} yielded {len(infos)} surrogates but declares surrogates_per_rollout = {m}")
    return loss, infos


def anchor_backward(backbone, traj, generator: torch.Generator, beta: float, factor: float, base=None) -> float:
    """Accumulate the gradient of factor * beta * mean ||v_theta(x_t) - v_base(x_t)||^2 at one random rollout state.

    v_base comes from `base` (a backbone over a frozen copy of the transformer, for full fine-tuning) or
    else from the same transformer with its LoRA switched off, which costs one forward and no memory.
    It is the flow-matching analogue of a KL penalty to the base policy: the reward can move the field
    only as far as its gain pays for.  Returns the value (a 0-dim tensor).
    """
    t = int(torch.randint(traj.num_steps, (1,), generator=generator))
    x, sigma = traj.states[t], traj.sigmas[t]
    with torch.no_grad():
        if base is not None:
            v_base = base.velocity(x, sigma, traj.cond)
        else:
            backbone.transformer.disable_adapters()
            try:
                v_base = backbone.velocity(x, sigma, traj.cond)
            finally:
                backbone.transformer.enable_adapters()
    value = (backbone.velocity(x, sigma, traj.cond).float() - v_base.float()).pow(2).mean() * beta
    (value * factor).backward()
    return value.detach()


def step(backbone, objective: Objective, traj: Trajectory, generators: dict, factor: float = 1.0,
         agree: Callable[[bool], bool] = lambda ok: ok) -> StepResult:
    """Accumulate into .grad the gradient of factor x the objective on one rollout.

    `generators` holds "pairs" (the method's random choices) and "anchor" (the anchor's state);
    `agree` turns this process's "the reward is finite" into every process's verdict, so that all
    ranks run the same model calls.
    """
    o = objective
    r, losses, grad, components = reward_gradient(backbone, o.reward, traj.sample, traj.prompts, traj.height, traj.width,
                                                  o.lam, o.scale, need_grad=o.method.reward_on_sample, chunk=o.decode_batch,
                                                  balance=o.balance)
    result = StepResult(r, components, active=(losses > 0).float().mean())
    if not agree(bool(torch.isfinite(r).all() and (grad is None or torch.isfinite(grad).all()))):
        result.bad = "reward"
        return result
    result.loss, result.infos = backward_surrogates(backbone, o.method, o.reward, traj, grad, losses, generators["pairs"],
                                                    o.lam, o.scale, factor, o.balance)
    if o.anchor > 0:
        result.anchor = anchor_backward(backbone, traj, generators["anchor"], o.anchor, factor, o.anchor_base)
    checked = result.loss if result.anchor is None else result.loss + result.anchor
    if not bool(torch.isfinite(checked)):  # the step's one sync after its backwards
        result.bad = "loss"
    return result
