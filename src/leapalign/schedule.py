"""Noise schedules and steps of flow matching, as pure functions (diffusers' conventions).

sigma = 1 is pure noise, sigma = 0 is data; x_sigma = (1 - sigma) x_data + sigma noise.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: mu linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift_exponential(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Dynamic shift, sigma -> e^mu / (e^mu + (1/sigma - 1)), as the scheduler applies it."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    """SD3's static shift, sigma -> shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, *, mu: float | None = None, shift: float = 1.0) -> torch.Tensor:
    """The N + 1 sigmas of a rollout, from 1 shifted down to a final 0.

    Matches FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)
    with use_dynamic_shifting when `mu` is given, or its static `shift` otherwise.
    """
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)  # the scheduler casts first
    sigmas = time_shift_exponential(mu, sigmas) if mu is not None else static_shift(shift, sigmas)
    return torch.cat([torch.from_numpy(np.asarray(sigmas)).to(torch.float32), torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i), rounded exactly like the scheduler.

    FlowMatchEulerDiscreteScheduler.step upcasts x to float32 but multiplies dt by v in v's dtype
    (a 0-dim float32 tensor does not promote a bf16 tensor), then casts back to v's dtype.
    """
    return (x.float() + (sigma_next - sigma) * v).to(v.dtype)


leap = euler_step  # a leap is an Euler step over a long interval: x_j = x_k + (sigma_j - sigma_k) v


def connect(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Straight-through connector: the value of `real`, the gradient of `pred`."""
    return pred + (real - pred).detach()


def discount(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha x + (1 - alpha) sg(x): same value, gradient scaled by alpha."""
    if alpha == 1.0:
        return x
    if alpha == 0.0:
        return x.detach()
    return alpha * x + (1 - alpha) * x.detach()
