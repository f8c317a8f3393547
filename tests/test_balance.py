"""reward.balance: every sample's reward gradient rescaled to the batch's mean norm.

Checked against references computed one sample at a time (the reward is per image, so a sample scored alone
has its own gradient), for the shared gradient of connected surrogates and for a surrogate scored at its
own endpoint (ReFL), which the trainer balances in backward.
"""
from __future__ import annotations

import pytest
import torch
from conftest import TOY_SCALE, TOY_SIZE, Setup, assert_grads_close

from leapalign.methods.refl import refl_surrogate
from leapalign.objective import backward_surrogates, balance_rows, reward_gradient

from test_methods import Fixed

H = W = TOY_SIZE


@pytest.fixture(scope="module")
def s(tiny_flux_pipe):
    from conftest import PROMPTS

    return Setup(tiny_flux_pipe, list(PROMPTS))


def one_at_a_time(s, x):
    """dHinge_b/dx_b of each latent of x, each decoded and scored alone."""
    return torch.cat([reward_gradient(s.bb, s.reward, x[b:b + 1], s.traj.prompts[b:b + 1], H, W, s.lam, TOY_SCALE)[2]
                      for b in range(s.B)])


def test_balanced_rows_point_where_each_sample_points_with_the_batch_mean_norm(s):
    raw = one_at_a_time(s, s.traj.sample)
    norms = raw.flatten(1).norm(dim=1)
    live = norms > 0
    assert 0 < int(live.sum()) < s.B  # the toy margin leaves some samples above it: their rows must stay zero
    assert norms[live].max() > 1.05 * norms[live].min()  # unequal to begin with, or the test could not fail
    got = reward_gradient(s.bb, s.reward, s.traj.sample, s.traj.prompts, H, W, s.lam, TOY_SCALE, balance=True)[2]
    target = norms[live].mean()
    expect = torch.stack([raw[b] / norms[b] * target if live[b] else raw[b] for b in range(s.B)])
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-7)
    # the same when decoded in chunks: balancing happens after the whole batch is scored
    chunked = reward_gradient(s.bb, s.reward, s.traj.sample, s.traj.prompts, H, W, s.lam, TOY_SCALE, chunk=3, balance=True)[2]
    torch.testing.assert_close(chunked, expect, rtol=1e-4, atol=1e-7)


def test_balance_leaves_an_all_zero_gradient_zero():
    g = torch.zeros(3, 4, 2, 2)
    assert torch.equal(balance_rows(g), g)


def test_balanced_refl_equals_the_reference(s):
    """ReFL is scored at its own one-step prediction: the trainer balances the gradient arriving there."""
    t = 5
    s.grads()
    with torch.no_grad():
        pred = refl_surrogate(s.bb, s.traj, t).endpoint
    raw = one_at_a_time(s, pred)
    balanced = balance_rows(raw)
    assert not torch.allclose(balanced, raw)
    # reference: the prediction re-made with gradient, the balanced per-sample gradient back-propagated (batch mean)
    x_t = s.traj.states[t]
    endpoint = x_t - s.traj.sigmas[t] * s.bb.velocity(x_t.detach(), s.traj.sigmas[t], s.traj.cond)
    ref = s.reference((endpoint * (balanced / s.B)).sum())

    s.grads()
    x = s.traj.sample.detach().requires_grad_(True)
    losses = s.hinge(s.decode(x))
    (g,) = torch.autograd.grad(losses.sum(), x)
    backward_surrogates(s.bb, Fixed(lambda bb, tr: refl_surrogate(bb, tr, t)), s.reward, s.traj, g, losses.detach(),
                        torch.Generator().manual_seed(0), s.lam, TOY_SCALE, balance=True)
    assert_grads_close(s.grads(), ref)

