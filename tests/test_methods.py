"""The baseline methods against independent, direct references written out with plain torch ops.

Library: the trainer's own `backward_surrogates` (shared reward gradient for connected surrogates,
decode-and-score for unconnected ones, mean over the surrogates of a rollout).
Reference: the method's loss as its paper writes it, decoded, scored with a toy reward, hinged,
averaged over the batch, back-propagated.  The transformer's parameter gradients must agree.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TOY_STEPS as STEPS, Setup, assert_grads_close, grads_differ

from leapalign.errors import UserError
from leapalign.methods import REGISTRY, Method, build_method
from leapalign.methods.alignprop import gaussian_k
from leapalign.methods.draft import DraftLV, chain_surrogate, lv_surrogate
from leapalign.methods.drtune import drtune_surrogate, spaced_steps
from leapalign.methods.flowbp import flowbp_surrogate, late_biased_steps
from leapalign.methods.refl import refl_surrogate, window_steps

H = W = 16


class Fixed(Method):
    """A method whose random choices are fixed by the test: yields what `build(backbone, traj)` returns."""

    def __init__(self, *build):
        self.build = build

    @property
    def surrogates_per_rollout(self):
        return len(self.build)

    def surrogates(self, backbone, traj, generator):
        for b in self.build:
            yield b(backbone, traj)


@pytest.fixture(scope="module")
def s(tiny_flux_pipe):
    from conftest import PROMPTS

    return Setup(tiny_flux_pipe, list(PROMPTS))


def v(s, x, i):
    return s.bb.velocity(x, s.traj.sigmas[i], s.traj.cond)


# ---------------------------------------------------------------- references


def ref_refl(s, t):
    x_t, sig = s.traj.states[t], s.traj.sigmas
    return s.loss(x_t - sig[t] * v(s, x_t.detach(), t))


def ref_chain(s, K):
    """Plain Euler steps N-K ... N-1 with autograd; the real x_N's value, the chain's gradient."""
    x, sig = s.traj.states[STEPS - K].detach(), s.traj.sigmas
    for i in range(STEPS - K, STEPS):
        x = x + (sig[i + 1] - sig[i]) * v(s, x, i)
    return s.loss(x + (s.traj.sample - x).detach()), x


def ref_lv(s, eps_list, include_base=True):
    """The batch mean over DRaFT-1's prediction (the last step re-run with gradient) and the n re-noised ones."""
    sig = s.traj.sigmas[STEPS - 1]
    terms = [ref_chain(s, 1)[0]] if include_base else []
    for eps in eps_list:
        xp = (1 - sig) * s.traj.sample + sig * eps
        terms.append(s.loss(xp - sig * v(s, xp, STEPS - 1)))
    return sum(terms) / len(terms)


def ref_drtune(s, trained, t_min, keep_all=False, train_stop=False):
    """DRTune's sampling loop re-run from the noise: inputs detached, untrained velocities detached; the stop step's
    velocity keeps its gradient only when it is trained (or train_stop)."""
    sig = s.traj.sigmas
    x = s.traj.states[0]
    for i in range(t_min):
        vi = v(s, x.detach(), i)
        x = x + (sig[i + 1] - sig[i]) * (vi if (keep_all or i in trained) else vi.detach())
    v_stop = v(s, x.detach(), t_min)
    if not (train_stop or t_min in trained):
        v_stop = v_stop.detach()
    return s.loss(x - sig[t_min] * v_stop), x


def ref_flowbp(s, active, g=1.0):
    """Straight-through: value x_N, gradient g x the sum over active i of dt_i dv_i/dtheta (inputs detached)."""
    sig, x = s.traj.sigmas, s.traj.states
    inc = sum((sig[i + 1] - sig[i]) * v(s, x[i].detach(), i) for i in active)
    return s.loss(s.traj.sample + g * (inc - inc.detach()))


# ---------------------------------------------------------------- fixed choices == reference


@pytest.mark.parametrize("t", [3, 5])
def test_refl_gradient(s, t):
    sur = refl_surrogate(s.bb, s.traj, t)
    assert not sur.connected and sur.info["k"] == t
    g, _ = s.library(Fixed(lambda bb, tr: refl_surrogate(bb, tr, t)))
    assert_grads_close(g, s.reference(ref_refl(s, t)))


@pytest.mark.parametrize("K", [1, 3])
def test_draft_k_gradient_and_endpoint(s, K):
    sur = chain_surrogate(s.bb, s.traj, K)
    assert sur.connected and (sur.info["k"], sur.info["K"]) == (STEPS - K, K)
    torch.testing.assert_close(sur.endpoint.detach(), s.traj.sample, rtol=0, atol=1e-5)
    loss, x_chain = ref_chain(s, K)
    torch.testing.assert_close(x_chain.detach(), s.traj.sample, rtol=0, atol=1e-5)  # recomputation == rollout
    g_ref = s.reference(loss)
    g, _ = s.library(build_method({"name": "draft_k", "k": K}))
    assert_grads_close(g, g_ref)


def test_alignprop_checkpointing_matches_plain_and_reference(s):
    g_ref = s.reference(ref_chain(s, STEPS)[0])
    g_ckpt, _ = s.library(Fixed(lambda bb, tr: chain_surrogate(bb, tr, STEPS, checkpointing=True)))
    g_plain, _ = s.library(Fixed(lambda bb, tr: chain_surrogate(bb, tr, STEPS, checkpointing=False)))
    assert_grads_close(g_ckpt, g_ref)
    assert_grads_close(g_plain, g_ref)
    assert grads_differ(s.reference(ref_chain(s, 1)[0]), g_ref)  # K matters


def test_alignprop_method_draws_k_and_matches_reference(s):
    seen = set()
    for seed in range(12):
        g, infos = s.library(build_method({"name": "alignprop", "truncation": "uniform", "max_k": 3}), torch.Generator().manual_seed(seed))
        (info,) = infos
        assert 1 <= info["K"] <= 3 and info["k"] == STEPS - info["K"]
        if info["K"] not in seen:
            seen.add(info["K"])
            assert_grads_close(g, s.reference(ref_chain(s, info["K"])[0]))
    assert seen == {1, 2, 3}
    infos = list(build_method({"name": "alignprop", "truncation": "uniform", "max_k": 99}).surrogates(s.bb, s.traj, torch.Generator().manual_seed(0)))
    assert 1 <= infos[0].info["K"] <= STEPS  # clamped to the rollout


def test_alignprop_default_truncation_is_its_gaussian():
    """AlignProp's code: the start t ~ Normal(42, 5) of 50 steps, redrawn into [1, 49]; K = 50 - t, about 8."""
    gen = torch.Generator().manual_seed(0)
    ks = torch.tensor([gaussian_k(50, 0.84, 0.1, gen) for _ in range(4000)], dtype=torch.float64)
    assert 1 <= ks.min() and ks.max() <= 49
    # int() truncation and the rejected tail t >= 50: E[K] = 50 - E[int(t)] ~ 9.1 (measured 9.09)
    assert 8.6 < ks.mean() < 9.6 and 4.0 < ks.std() < 5.5
    assert all(1 <= gaussian_k(6, 0.84, 0.1, gen) <= 5 for _ in range(200))
    assert build_method({"name": "alignprop"}).truncation == "gaussian"


@pytest.mark.parametrize("include_base", [True, False])
def test_draft_lv_averages_base_and_renoisings(s, include_base):
    seed, n = 3, 2
    gen = torch.Generator().manual_seed(seed)
    eps = [torch.randn(s.traj.sample.shape, generator=gen) for _ in range(n)]
    g_ref = s.reference(ref_lv(s, eps, include_base))
    g, infos = s.library(DraftLV(n=n, include_base=include_base), torch.Generator().manual_seed(seed))
    assert [i["k"] for i in infos] == [STEPS - 1] * (n + include_base)
    assert_grads_close(g, g_ref)
    assert grads_differ(s.reference(ref_lv(s, eps[:1], include_base)), g_ref)  # both draws count
    assert grads_differ(s.reference(ref_lv(s, eps, not include_base)), g_ref)  # and the base term is (not) in the mean
    sur = lv_surrogate(s.bb, s.traj, s.traj.sample)
    assert not sur.connected and torch.equal(sur.weight, torch.ones(s.B))


@pytest.mark.parametrize("trained,t_min,train_stop", [([0, 2], 4, False), ([1, 3], 3, False), ([], 5, True), ([1], 3, True)])
def test_drtune_gradient(s, trained, t_min, train_stop):
    loss, x_tmin = ref_drtune(s, trained, t_min, train_stop=train_stop)
    torch.testing.assert_close(x_tmin.detach(), s.traj.states[t_min], rtol=0, atol=1e-5)
    g_ref = s.reference(loss)
    sur = drtune_surrogate(s.bb, s.traj, trained, t_min, train_stop)
    assert not sur.connected and (sur.info["k"], sur.info["j"]) == (trained, t_min)
    g, _ = s.library(Fixed(lambda bb, tr: drtune_surrogate(bb, tr, trained, t_min, train_stop)))
    assert_grads_close(g, g_ref)
    # the detached steps contribute nothing: keeping them all would change the gradient
    assert grads_differ(s.reference(ref_drtune(s, trained, t_min, keep_all=True, train_stop=train_stop)[0]), g_ref)
    if trained and t_min not in trained and not train_stop:  # the stop step's velocity carries gradient only when it is trained
        assert grads_differ(s.reference(ref_drtune(s, trained, t_min, train_stop=True)[0]), g_ref)


def test_drtune_method_choices(s):
    """Defaults: t_min from the last 40% of the rollout, k = 3 steps evenly spaced over 0 ... t_min."""
    for seed in range(8):
        g, (info,) = s.library(build_method({"name": "drtune"}), torch.Generator().manual_seed(seed))
        t_min, trained = info["j"], info["k"]
        assert t_min in window_steps(STEPS, (0.6, 1.0)) == [4, 5]
        stride = (t_min + 1) // 3
        assert len(trained) == 3 and all(b - a == stride for a, b in zip(trained, trained[1:])) and 0 <= trained[0] and trained[-1] <= t_min
        if seed < 2:
            assert_grads_close(g, s.reference(ref_drtune(s, trained, t_min)[0]))


def test_spaced_steps_are_even_over_the_prefix_with_random_offset():
    """The reference's rule: stride (t_min + 1) // k, start uniform in [0, t_min - (k - 1) stride]."""
    starts = set()
    for seed in range(60):
        steps = spaced_steps(24, 3, torch.Generator().manual_seed(seed))  # t_min = 24 of 25: stride 8, start 0 ... 8
        assert len(steps) == 3 and steps[1] - steps[0] == steps[2] - steps[1] == 8 and steps[2] <= 24
        starts.add(steps[0])
    assert starts == set(range(9))  # t_min itself is trained when the start is 8
    assert spaced_steps(2, 3, torch.Generator()) == [0, 1, 2]
    assert spaced_steps(0, 2, torch.Generator()) == [0]


@pytest.mark.parametrize("active", [[2], [0, 4]])
def test_flowbp_sparse_gradient_and_endpoint(s, active):
    """Without rescaling (grad_rescale 0)."""
    x, sig, vel = s.traj.states, s.traj.sigmas, s.traj.velocities
    rebuilt = x[0] + sum((sig[i + 1] - sig[i]) * vel[i] for i in range(STEPS))
    torch.testing.assert_close(rebuilt, s.traj.sample, rtol=0, atol=1e-5)
    sur = flowbp_surrogate(s.bb, s.traj, active)
    assert sur.connected and sur.info["k"] == active
    torch.testing.assert_close(sur.endpoint.detach(), s.traj.sample, rtol=0, atol=1e-5)
    g, _ = s.library(Fixed(lambda bb, tr: flowbp_surrogate(bb, tr, active)))
    assert_grads_close(g, s.reference(ref_flowbp(s, active)))


def test_flowbp_sparse_method(s):
    """Defaults: 3 active steps, the gradient rescaled by the whole sigma span over the active steps' (1 / that sum)."""
    method = build_method({"name": "flowbp_sparse"})
    assert method.needs_velocities and (method.k, method.late_bias, method.grad_rescale) == (3, 2.0, 1.0)
    g, (info,) = s.library(method, torch.Generator().manual_seed(1))
    active = info["k"]
    assert len(set(active)) == 3 and all(0 <= i < STEPS for i in active)
    sig = s.traj.sigmas
    span = 1.0 / sum(float(sig[i] - sig[i + 1]) for i in active)  # sigma runs from 1 to 0
    assert_grads_close(g, s.reference(ref_flowbp(s, active, g=span)))
    assert grads_differ(s.reference(ref_flowbp(s, active)), g)
    g_half, _ = s.library(build_method({"name": "flowbp_sparse", "grad_rescale": 0.5}), torch.Generator().manual_seed(1))
    assert_grads_close(g_half, s.reference(ref_flowbp(s, active, g=1 + 0.5 * (span - 1))))
    with pytest.raises(UserError, match="method.k"):
        list(build_method({"name": "flowbp_sparse", "k": STEPS + 1}).surrogates(s.bb, s.traj, torch.Generator()))


def test_flowbp_sparse_draws_late_steps_more_often():
    """P(i) proportional to (i + 1)^2 without replacement: with k = 1 the frequencies follow the weights."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(6000):
        counts[late_biased_steps(6, 1, 2.0, gen)[0]] += 1
    want = torch.arange(1, 7, dtype=torch.float32) ** 2
    torch.testing.assert_close(counts / counts.sum(), want / want.sum(), atol=0.02, rtol=0)
    assert all(len(set(late_biased_steps(6, 4, 2.0, gen))) == 4 for _ in range(50))


def test_refl_method_draws_from_window(s):
    seen = set()
    for seed in range(12):
        (sur,) = build_method({"name": "refl"}).surrogates(s.bb, s.traj, torch.Generator().manual_seed(seed))
        seen.add(sur.info["k"])
    assert seen == {4, 5}  # the last quarter of 6 steps (ImageReward: steps 30-39 of 40)
    assert window_steps(40, (0.75, 1.0)) == list(range(30, 40))
    g, (info,) = s.library(build_method({"name": "refl", "window": [0.0, 0.5]}), torch.Generator().manual_seed(4))
    assert info["k"] in (0, 1, 2)
    assert_grads_close(g, s.reference(ref_refl(s, info["k"])))


# ---------------------------------------------------------------- options


def test_every_method_builds_with_defaults():
    for name in REGISTRY:
        method = build_method({"name": name})
        assert method.name == name
        typed = build_method({"name": name}, typed_options=True)  # config.yaml spells every option out
        assert typed["name"] == name and build_method(typed) == method
        assert set(typed) == {"name"} | {f.name for f in dataclasses.fields(method) if f.init}


@pytest.mark.parametrize("options,word", [
    ({"name": "refl", "window": [0.5, 0.5]}, "method.window"),
    ({"name": "refl", "window": [0.0, 1.5]}, "method.window"),
    ({"name": "draft_k", "k": 0}, "method.k"),
    ({"name": "draft_lv", "n": 0}, "method.n"),
    ({"name": "drtune", "k": 0}, "method.k"),
    ({"name": "drtune", "stop_window": [0.9, 0.2]}, "method.stop_window"),
    ({"name": "alignprop", "max_k": 0}, "method.max_k"),
    ({"name": "alignprop", "truncation": "normal"}, "method.truncation"),
    ({"name": "alignprop", "mean": 1.5}, "method.mean"),
    ({"name": "flowbp_sparse", "late_bias": -1}, "method.late_bias"),
    ({"name": "flowbp_sparse", "k": -1}, "method.k"),
    ({"name": "alignprop", "checkpointing": "maybe"}, "method.checkpointing"),
    ({"name": "draft_k", "K": 2}, "method.K"),
])
def test_bad_options_raise_user_error(options, word):
    with pytest.raises(UserError, match=word.replace(".", r"\.")):
        build_method(options)


def test_empty_window_and_too_many_steps_are_clear(s):
    with pytest.raises(UserError, match="method.window"):
        window_steps(4, (0.5, 0.6))
    with pytest.raises(UserError, match="method.k"):
        chain_surrogate(s.bb, s.traj, STEPS + 1)


def test_every_method_runs_in_bf16(tiny_flux_pipe_bf16):
    """The dtype of GPU rollouts: every method trains through the real trainer path, finite gradients."""
    from conftest import PROMPTS

    bf = Setup(tiny_flux_pipe_bf16, list(PROMPTS))
    for name in REGISTRY:
        g, infos = bf.library(build_method({"name": name}))
        assert infos and all(bool(torch.isfinite(t).all()) for t in g), name
        assert any(float(t.abs().max()) > 0 for t in g), name


def test_a_method_yielding_more_surrogates_than_it_declares_stops_before_their_gradient(s):
    """The check runs before the extra surrogate's backward: .grad holds only what the declared ones gave."""

    class TooMany(Fixed):
        @property
        def surrogates_per_rollout(self):
            return 1

    one = lambda bb, tr: refl_surrogate(bb, tr, 4)  # noqa: E731
    g_one, _ = s.library(Fixed(one))
    s.grads()
    with pytest.raises(RuntimeError, match="more surrogates"):
        s.library(TooMany(one, one))
    got = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in s.bb.transformer.parameters()]
    assert_grads_close(got, g_one)
    s.grads()


@pytest.mark.parametrize("opts", [{"name": "leapalign", "pairs_per_rollout": 2, "alpha": a} for a in (0.0, 0.3, 1.0)]
                         + [{"name": "refl"}, {"name": "drtune", "k": 2}, {"name": "drtune", "k": 2, "train_stop": True},
                            {"name": "draft_k", "k": 3}, {"name": "draft_k", "k": 3, "checkpointing": True}, {"name": "draft_lv"},
                            {"name": "alignprop"}, {"name": "alignprop", "truncation": "uniform", "checkpointing": False}])
def test_the_rollouts_kept_calls_give_the_recomputed_gradient_with_fewer_forwards(tiny_flux_pipe, opts):
    """`rollout_for` keeps the calls the surrogates will back-propagate (LeapAlign's x_k and x_j, the second through its
    connected input; ReFL's and DRTune's at sg(x_i); DRaFT's and AlignProp's chains, all but their first through the
    chain's input, checkpointed ones recomputed in the backward); the surrogates make none of their own, each kept
    call is used once, and the gradient is the one of recomputed calls."""
    from conftest import PROMPTS

    from leapalign.objective import rollout_for

    method = build_method(opts)
    s = Setup(tiny_flux_pipe, list(PROMPTS))
    calls = []
    hook = s.bb.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        plain, plain_infos = s.library(method, torch.Generator().manual_seed(3))
        recomputed = len(calls)
        calls.clear()
        s.traj = rollout_for(s.bb, method, list(PROMPTS), STEPS, H, W, s.traj.states[0], torch.Generator().manual_seed(3))
        kept = len(s.traj.graphs)
        reused, infos = s.library(method, torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    assert [(i["k"], i.get("j")) for i in infos] == [(i["k"], i.get("j")) for i in plain_infos]
    assert kept >= 1 and s.traj.graphs == {}
    assert len(calls) == STEPS + recomputed - kept  # DRTune's untrained stop call is still made, without gradient
    assert_grads_close(reused, plain, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in reused)
