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


def scheduler_sigmas(cfg, num_steps: int, mu: float | None) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu).sigmas.

    Covers dynamic (exponential / linear) and static shift and `shift_terminal` (Qwen-Image);
    the options that change the sampler itself are refused rather than silently mis-reproduced.
    """
    for opt in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling", "use_flow_sigmas"):
        if cfg.get(opt, False):
            raise ValueError(f"the scheduler option {opt} is not supported by leapalign's rollout")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)  # the scheduler casts first
    if cfg.get("use_dynamic_shifting", False):
        if cfg.get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = time_shift_exponential(mu, sigmas)
    else:
        sigmas = static_shift(cfg.get("shift", 1.0), sigmas)
    if cfg.get("shift_terminal", None):
        if num_steps < 2:  # the stretch divides by 1 - sigma_last = 0: the pipeline itself gives NaN
            raise ValueError("this scheduler (shift_terminal) needs at least 2 sampling steps")
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    return torch.cat([torch.from_numpy(np.asarray(sigmas)).to(torch.float32), torch.zeros(1)])


def flow_sigmas(num_steps: int, *, mu: float | None = None, shift: float = 1.0) -> torch.Tensor:
    """scheduler_sigmas for a plain scheduler: dynamic shift when `mu` is given, the static `shift` otherwise."""
    return scheduler_sigmas({"use_dynamic_shifting": mu is not None, "shift": shift}, num_steps, mu)


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
