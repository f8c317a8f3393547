"""LeapAlign's surrogate against an independent, direct reference (the paper's way of writing it).

Reference: build the surrogate inline with plain torch ops, decode the connector output, score
it with a toy differentiable reward, hinge, weight, mean, backward.
Library: compute the reward gradient G = dL/dx_N once at the real sample, then back-propagate
leap_surrogate's endpoint with grad_tensors = G * weight / B.
The transformer's parameter gradients must agree.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from conftest import PROMPTS, TOY_SCALE as SCALE, TOY_STEPS as STEPS, Setup, assert_grads_close, grads_differ

from leapalign.methods.leapalign import LeapAlign, leap_surrogate, sample_pairs

H = W = 16
TAU = 1e-3  # the tiny random model leaps accurately (d ~ 0.02), so the paper's 0.1 would clamp every weight


def reference_loss(s: Setup, k, j, alpha, tau, weighting, detach_second_input=False):
    """The LeapAlign loss written out directly (no schedule helpers, no library surrogate)."""
    bb, traj = s.bb, s.traj
    x, sig, cond = traj.states, traj.sigmas, traj.cond
    x_k, x_j, x_n = x[k], x[j], x[-1]
    v1 = bb.velocity(x_k.detach(), sig[k], cond)
    xhat_j = x_k + (sig[j] - sig[k]) * v1
    xt_j = xhat_j + (x_j - xhat_j).detach()
    if detach_second_input:
        xin_j = xt_j.detach()
    else:
        xin_j = alpha * xt_j + (1 - alpha) * xt_j.detach()
    v2 = bb.velocity(xin_j, sig[j], cond)
    xhat_n = xt_j + (0.0 - sig[j]) * v2
    xt_n = xhat_n + (x_n - xhat_n).detach()
    img = bb.decode(xt_n, H, W)
    per_sample = torch.relu(s.lam - s.reward(img)) * SCALE
    with torch.no_grad():
        d_j = (xhat_j - x_j).abs().mean(dim=(1, 2))
        d_n = (xhat_n - x_n).abs().mean(dim=(1, 2))
        w = 1.0 / (torch.clamp(d_j, min=tau) + torch.clamp(d_n, min=tau)) if weighting else torch.ones(s.B)
    return (w * per_sample).mean(), w, d_j, d_n


@pytest.fixture(scope="module")
def setup(tiny_flux_pipe):
    return Setup(tiny_flux_pipe, list(PROMPTS))


@pytest.fixture(scope="module")
def setup_merged(tiny_flux_pipe_merged):
    return Setup(tiny_flux_pipe_merged, list(PROMPTS), seed=1)


# ---------------------------------------------------------------- surrogate == reference


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighting", [True, False])
@pytest.mark.parametrize("kj", [(1, 4), (0, 5)])
def test_library_gradient_equals_direct_reference(setup, alpha, weighting, kj):
    s = setup
    k, j = kj
    s.zero()
    loss, w_ref, d_j, d_n = reference_loss(s, k, j, alpha, TAU, weighting)
    loss.backward()
    g_ref = s.grads()

    G = s.reward_grad()
    assert torch.count_nonzero(G.flatten(1).abs().sum(1)) == 2  # two active hinges, one inactive
    sur = leap_surrogate(s.bb, s.traj, k, j, alpha, TAU, weighting)
    assert sur.connected
    torch.testing.assert_close(sur.endpoint.detach(), s.traj.sample, rtol=0, atol=1e-6)
    torch.testing.assert_close(sur.weight, w_ref, rtol=1e-6, atol=0)
    assert not sur.weight.requires_grad
    if weighting:
        assert bool((sur.weight != 1).all()) and sur.weight.unique().numel() == s.B
    assert (sur.info["k"], sur.info["j"]) == (k, j)
    assert float(sur.info["d_j"]) == pytest.approx(d_j.mean().item(), rel=1e-5)
    assert sur.info["d_N"] == pytest.approx(d_n.mean().item(), rel=1e-5)
    torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / s.B)
    g_lib = s.grads()
    assert_grads_close(g_lib, g_ref)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_library_gradient_equals_reference_with_merged_padding(setup_merged, alpha):
    s = setup_merged
    s.zero()
    loss, *_ = reference_loss(s, 1, 4, alpha, TAU, True)
    loss.backward()
    g_ref = s.grads()
    G = s.reward_grad()
    sur = leap_surrogate(s.bb, s.traj, 1, 4, alpha, TAU, True)
    torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / s.B)
    assert_grads_close(s.grads(), g_ref)


def test_weight_uses_tau_floor(setup):
    s = setup
    sur = leap_surrogate(s.bb, s.traj, 1, 4, 0.3, 100.0, True)
    torch.testing.assert_close(sur.weight, torch.full((s.B,), 1 / 200.0))
    sur_small = leap_surrogate(s.bb, s.traj, 1, 4, 0.3, 1e-6, True)
    _, w, d_j, d_n = reference_loss(s, 1, 4, 0.3, 1e-6, True)
    torch.testing.assert_close(sur_small.weight, 1 / (d_j + d_n), rtol=1e-6, atol=0)
    s.zero()


# ---------------------------------------------------------------- the discount alpha


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_state_gradient_is_identity_plus_alpha_times_velocity_jacobian(setup, alpha):
    """d xt_N / d x_k applied to g is g + alpha (0 - sigma_j) J_v(x_j)^T g: the identity path keeps
    full gradient, the network-input path is scaled by alpha, and no gradient enters through the
    first call's input (sg(x_k)) or through x_j, x_N (they only appear under stop-gradient)."""
    s = setup
    k, j = 1, 4
    states = s.traj.states.clone().requires_grad_(True)
    traj = dataclasses.replace(s.traj, states=states)
    g = torch.randn(s.traj.sample.shape, generator=torch.Generator().manual_seed(3))
    sur = leap_surrogate(s.bb, traj, k, j, alpha, TAU, True)
    (gs,) = torch.autograd.grad(sur.endpoint, states, g)

    xj = s.traj.states[j].clone().requires_grad_(True)
    v = s.bb.velocity(xj, s.traj.sigmas[j], s.traj.cond)
    (vjp,) = torch.autograd.grad(v, xj, g)
    assert vjp.abs().max() > 1e-3  # the Jacobian term is not negligible, so alpha is visible
    expected = g + alpha * (0.0 - s.traj.sigmas[j]) * vjp
    torch.testing.assert_close(gs[k], expected, rtol=1e-5, atol=1e-6)
    others = torch.cat([gs[:k], gs[k + 1:]])
    assert torch.count_nonzero(others) == 0
    s.zero()


def test_alpha_zero_equals_explicitly_detached_second_input(setup):
    s = setup
    s.zero()
    loss, *_ = reference_loss(s, 1, 4, 0.0, TAU, True, detach_second_input=True)
    loss.backward()
    g_detached = s.grads()
    G = s.reward_grad()
    grads = {}
    for alpha in (0.0, 0.3):
        sur = leap_surrogate(s.bb, s.traj, 1, 4, alpha, TAU, True)
        torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / s.B)
        grads[alpha] = s.grads()
    assert_grads_close(grads[0.0], g_detached)
    assert grads_differ(grads[0.3], g_detached)


def test_alpha_zero_no_gradient_reaches_second_call_input(setup):
    """Hook the second velocity call's input: with alpha = 0 it gets no gradient, with alpha > 0 it does."""
    s = setup
    bb = s.bb
    for alpha, expect_grad in ((0.0, False), (0.3, True)):
        seen = []
        orig = bb.velocity

        def spy(x, sigma, cond):
            seen.append(x)
            if x.requires_grad:
                x.retain_grad()
            return orig(x, sigma, cond)

        bb.velocity = spy
        try:
            states = s.traj.states.clone().requires_grad_(True)
            sur = leap_surrogate(bb, dataclasses.replace(s.traj, states=states), 1, 4, alpha, TAU, True)
        finally:
            del bb.velocity
        assert len(seen) == 2
        assert not seen[0].requires_grad  # the first call always sees sg(x_k)
        sur.endpoint.backward(torch.ones_like(sur.endpoint))
        second = seen[1]
        got = second.requires_grad and second.grad is not None and bool(second.grad.abs().max() > 0)
        assert got == expect_grad, (alpha, got)
        s.zero()


# ---------------------------------------------------------------- several pairs, one reward gradient


def test_many_pairs_share_one_reward_gradient(setup):
    s = setup
    pairs = [(0, 3), (1, 4), (2, 5), (1, 2)]
    m = len(pairs)
    alpha = 0.3

    # reference: every pair decoded and scored on its own, total = mean over pairs
    s.zero()
    total = sum(reference_loss(s, k, j, alpha, TAU, True)[0] for k, j in pairs) / m
    total.backward()
    g_ref = s.grads()

    G = s.reward_grad()
    # library, one pair at a time (freed between passes), gradients accumulate
    for k, j in pairs:
        sur = leap_surrogate(s.bb, s.traj, k, j, alpha, TAU, True)
        torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / (s.B * m))
    g_sep = s.grads()
    # library, all surrogates in one backward pass
    surs = [leap_surrogate(s.bb, s.traj, k, j, alpha, TAU, True) for k, j in pairs]
    torch.autograd.backward([x.endpoint for x in surs], [G * x.weight[:, None, None] / (s.B * m) for x in surs])
    g_joint = s.grads()

    assert_grads_close(g_sep, g_ref)
    assert_grads_close(g_joint, g_ref)
    # sanity: one pair alone is not the whole story
    sur = leap_surrogate(s.bb, s.traj, 0, 3, alpha, TAU, True)
    torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / s.B)
    assert grads_differ(s.grads(), g_ref)


def test_method_surrogates_follow_sample_pairs(setup):
    s = setup
    method = LeapAlign(alpha=0.3, pairs_per_rollout=3)
    surs = list(method.surrogates(s.bb, s.traj, torch.Generator().manual_seed(5)))
    expected = sample_pairs(STEPS, 3, torch.Generator().manual_seed(5))
    assert [(x.info["k"], x.info["j"]) for x in surs] == expected
    G = s.reward_grad()
    for sur, (k, j) in zip(surs, expected):
        torch.testing.assert_close(sur.endpoint.detach(), s.traj.sample, rtol=0, atol=1e-6)
        torch.autograd.backward(sur.endpoint, grad_tensors=G * sur.weight[:, None, None] / s.B)
        g_method = s.grads()
        loss, *_ = reference_loss(s, k, j, 0.3, method.tau, True)
        loss.backward()
        assert_grads_close(g_method, s.grads())


# ---------------------------------------------------------------- pair sampling


def test_sample_pairs_are_ordered_and_inside_window():
    gen = torch.Generator().manual_seed(0)
    for window in [(0.0, 1.0), (0.5, 1.0), (0.2, 0.8)]:
        lo, hi = round(window[0] * 10), round(window[1] * 10)
        pairs = sample_pairs(10, 300, gen, window=window)
        assert len(pairs) == 300
        assert all(lo <= k < j < hi for k, j in pairs), window


def test_sample_pairs_cover_all_pairs_uniformly():
    n = 6
    pairs = sample_pairs(n, 3000, torch.Generator().manual_seed(1))
    counts = Counter(pairs)
    all_pairs = {(k, j) for k in range(n) for j in range(n) if k < j}
    assert set(counts) == all_pairs
    expected = 3000 / len(all_pairs)
    assert all(abs(c - expected) < 0.3 * expected for c in counts.values()), counts


def test_sample_pairs_late_half_window():
    pairs = set(sample_pairs(6, 500, torch.Generator().manual_seed(2), window=(0.5, 1.0)))
    assert pairs == {(3, 4), (3, 5), (4, 5)}


def test_sample_pairs_fixed_gap():
    pairs = sample_pairs(8, 500, torch.Generator().manual_seed(3), fixed_gap=3)
    assert all(j - k == 3 and 0 <= k and j < 8 for k, j in pairs)
    assert set(pairs) == {(k, k + 3) for k in range(5)}


def test_sample_pairs_is_deterministic_given_generator():
    a = sample_pairs(10, 20, torch.Generator().manual_seed(7))
    b = sample_pairs(10, 20, torch.Generator().manual_seed(7))
    c = sample_pairs(10, 20, torch.Generator().manual_seed(8))
    assert a == b and a != c


@pytest.mark.parametrize("kwargs", [
    dict(num_steps=4, window=(0.5, 0.6)),   # no step at all
    dict(num_steps=10, window=(0.9, 1.0)),  # a single step: no pair
    dict(num_steps=1),                      # one-step rollout
    dict(num_steps=6, fixed_gap=6),         # gap larger than the rollout
    dict(num_steps=10, window=(0.5, 1.0), fixed_gap=5),
])
def test_sample_pairs_empty_window_raises(kwargs):
    n = kwargs.pop("num_steps")
    with pytest.raises(ValueError, match=r"no step pairs"):
        sample_pairs(n, 1, torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("kwargs,word", [
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(tau=0.0), "tau"),
    (dict(tau=-1.0), "tau"),
    (dict(pairs_per_rollout=0), "pairs_per_rollout"),
    (dict(window=(0.5, 0.5)), "window"),
    (dict(window=(0.6, 0.4)), "window"),
    (dict(window=(-0.1, 1.0)), "window"),
    (dict(window=(0.0, 1.1)), "window"),
    (dict(fixed_gap=0), "fixed_gap"),
])
def test_leapalign_rejects_bad_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LeapAlign(**kwargs)


def test_leapalign_accepts_boundary_options():
    for a in (0.0, 1.0):
        assert LeapAlign(alpha=a).alpha == a
    LeapAlign(window=(0.0, 1.0), fixed_gap=1, pairs_per_rollout=4, tau=1e-3)

