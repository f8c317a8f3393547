"""schedule.py against diffusers' own scheduler and hand-computed numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from leapalign import schedule


@pytest.mark.parametrize("num_steps", [1, 2, 6, 25, 28, 50])
@pytest.mark.parametrize("mu", [0.5, 0.8, 1.15, 3.0])
def test_flow_sigmas_dynamic_shift_matches_diffusers(num_steps, mu):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = schedule.flow_sigmas(num_steps, mu=mu)
    assert ours.dtype == torch.float32
    assert ours.shape == (num_steps + 1,)
    assert torch.equal(ours, sched.sigmas.to(torch.float32)), (ours, sched.sigmas)


@pytest.mark.parametrize("num_steps", [1, 6, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_static_shift_matches_diffusers(num_steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    ours = schedule.flow_sigmas(num_steps, shift=shift)
    assert torch.equal(ours, sched.sigmas.to(torch.float32)), (ours, sched.sigmas)


def test_flow_sigmas_endpoints_and_monotone():
    s = schedule.flow_sigmas(10, mu=1.0)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # the shift must actually do something: shifted sigmas are above the unshifted linspace
    plain = torch.cat([torch.linspace(1.0, 0.1, 10), torch.zeros(1)])
    assert bool((s[1:-1] > plain[1:-1]).all())


@pytest.mark.parametrize("seq_len", [1, 16, 256, 1024, 2025, 4096, 8192])
@pytest.mark.parametrize("args", [(), (16, 256, 0.5, 1.15), (4, 64, 0.3, 2.0)])
def test_dynamic_shift_mu_matches_calculate_shift(seq_len, args):
    assert schedule.dynamic_shift_mu(seq_len, *args) == pytest.approx(calculate_shift(seq_len, *args), rel=1e-12, abs=1e-12)


def test_dynamic_shift_mu_hand_values():
    assert schedule.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert schedule.dynamic_shift_mu(4096) == pytest.approx(1.15)
    # 720x720 FLUX: 45x45 = 2025 tokens
    assert schedule.dynamic_shift_mu(2025) == pytest.approx(0.5 + (2025 - 256) * 0.65 / 3840)


def test_euler_step_value_and_gradients():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    v = torch.tensor([2.0, 0.5], requires_grad=True)
    out = schedule.euler_step(x, v, 0.8, 0.5)
    torch.testing.assert_close(out, torch.tensor([0.4, -2.15]), rtol=0, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2))
    torch.testing.assert_close(v.grad, torch.full((2,), -0.3), rtol=0, atol=1e-6)


def test_euler_step_with_tensor_sigmas():
    s = schedule.flow_sigmas(4, mu=0.7)
    x, v = torch.tensor([0.25]), torch.tensor([-1.5])
    out = schedule.euler_step(x, v, s[1], s[2])
    expected = 0.25 + (s[2].item() - s[1].item()) * -1.5
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_euler_step_keeps_dtype_and_computes_in_float32():
    x = torch.tensor([1.0, 3.0, -0.7], dtype=torch.bfloat16)
    v = torch.tensor([0.3, -1.1, 2.2], dtype=torch.bfloat16)
    out = schedule.euler_step(x, v, 0.9, 0.1)
    assert out.dtype == torch.bfloat16
    expected = (x.float() + (0.1 - 0.9) * v.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_leap_is_an_euler_step_over_a_long_interval():
    x, v = torch.tensor([1.0]), torch.tensor([2.0])
    assert schedule.leap(x, v, 0.8, 0.0).item() == pytest.approx(1.0 - 0.8 * 2.0)
    assert schedule.leap(x, v, 0.8, 0.5).item() == pytest.approx(0.4)


def test_connect_value_of_real_gradient_of_pred():
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    real = torch.tensor([5.0, -1.0, 0.5], requires_grad=True)
    out = schedule.connect(pred, real)
    torch.testing.assert_close(out, real.detach())
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(pred.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert real.grad is None or torch.count_nonzero(real.grad) == 0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_discount_value_and_gradient(alpha):
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = schedule.discount(x, alpha)
    torch.testing.assert_close(y, x.detach())
    if alpha == 0.0:
        assert not y.requires_grad
        return
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), alpha))


def test_discount_scales_only_its_own_path():
    # z = x + discount(x, a) * c: dz/dx = 1 + a * c (the identity path keeps full gradient)
    x = torch.tensor(2.0, requires_grad=True)
    z = x + schedule.discount(x, 0.3) * 5.0
    z.backward()
    assert x.grad.item() == pytest.approx(1.0 + 0.3 * 5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_euler_step_matches_scheduler_step_bit_for_bit(dtype):
    """The rollout's Euler update must be FlowMatchEulerDiscreteScheduler.step's, in every dtype.

    The scheduler upcasts the sample to float32 but multiplies dt (a float32 0-d tensor) with the
    model output in the model's dtype: prev = sample.float() + dt * model_output.
    """
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.9)
    sigmas = schedule.flow_sigmas(6, mu=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen).to(dtype)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(4, 64, generator=gen).to(dtype)
        ref = sched.step(v, t, x, return_dict=False)[0]
        ours = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours, ref), (i, (ours.float() - ref.float()).abs().max())
        x = ref
