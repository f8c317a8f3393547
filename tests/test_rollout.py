"""rollout() + FluxBackbone must reproduce diffusers' FluxPipeline for the same seed and settings."""
from __future__ import annotations

import math

import pytest
import torch

from leapalign import schedule
from leapalign.backbones.flux import FluxBackbone, merge_identical_padding, pack_latents, unpack_latents
from leapalign.rollout import rollout

H = W = 16  # vae_scale_factor 2 -> FLUX needs multiples of 4; 16x16 px = 8x8 latents = 16 tokens
STEPS = 6


def _pipe_images(pipe, prompts, steps, h, w, seed, output_type="pt", **kw):
    with torch.no_grad():
        return pipe(prompts, height=h, width=w, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), output_type=output_type, **kw).images


@pytest.mark.parametrize("steps,seed", [(STEPS, 0), (1, 1), (3, 7)])
def test_rollout_matches_pipeline_images(any_flux_pipe, prompts, steps, seed):
    pipe = any_flux_pipe
    bb = FluxBackbone(pipe)
    traj = rollout(bb, prompts, steps, H, W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = bb.decode(traj.sample, H, W)
    ref = _pipe_images(pipe, prompts, steps, H, W, seed)
    assert ours.shape == ref.shape == (len(prompts), 3, H, W)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_rollout_matches_pipeline_latents(any_flux_pipe, prompts):
    pipe = any_flux_pipe
    bb = FluxBackbone(pipe)
    traj = rollout(bb, prompts, STEPS, H, W, generator=torch.Generator().manual_seed(3))
    ref = _pipe_images(pipe, prompts, STEPS, H, W, 3, output_type="latent")
    assert traj.sample.shape == ref.shape
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)
    # the initial state is the pipeline's noise for that generator, and different seeds differ
    ref_other = _pipe_images(pipe, prompts, STEPS, H, W, 4, output_type="latent")
    assert (ref_other - ref).abs().max() > 1e-2


@pytest.mark.parametrize("size", [8, 24])
def test_rollout_matches_pipeline_other_square_resolutions(tiny_flux_pipe, prompts, size):
    bb = FluxBackbone(tiny_flux_pipe)
    traj = rollout(bb, prompts[:2], 4, size, size, generator=torch.Generator().manual_seed(5))
    ref = _pipe_images(tiny_flux_pipe, prompts[:2], 4, size, size, 5, output_type="latent")
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(16, 32), (8, 32), (24, 8)], ids=["16x32", "8x32", "24x8"])
def test_rollout_matches_pipeline_non_square(tiny_flux_pipe, prompts, hw):
    """check_resolution accepts non-square sizes, so the rollout must reproduce them too.

    (16, 32) has 4x8 = 32 tokens (not a square number); (8, 32) has 2x8 = 16 tokens, a square
    number, so guessing a square grid from the token count gives wrong positions silently.
    """
    h, w = hw
    bb = FluxBackbone(tiny_flux_pipe)
    bb.check_resolution(h, w)
    traj = rollout(bb, prompts[:1], 3, h, w, generator=torch.Generator().manual_seed(2))
    ref = _pipe_images(tiny_flux_pipe, prompts[:1], 3, h, w, 2, output_type="latent")
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)


def test_rollout_matches_pipeline_in_bfloat16(tiny_flux_pipe_bf16, prompts):
    """GPU rollouts run in bf16: the states must still be the pipeline's, bit for bit.

    This needs the same timestep rounding ((sigma * 1000) in bf16, / 1000) and the same Euler
    update as FlowMatchEulerDiscreteScheduler.step in bf16.
    """
    bb = FluxBackbone(tiny_flux_pipe_bf16)
    traj = rollout(bb, prompts, 4, H, W, generator=torch.Generator().manual_seed(0))
    ref = _pipe_images(tiny_flux_pipe_bf16, prompts, 4, H, W, 0, output_type="latent")
    assert traj.sample.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(traj.sample, ref), (traj.sample.float() - ref.float()).abs().max()


def test_rollout_guidance_scale_is_used(tiny_flux_pipe, prompts):
    bb = FluxBackbone(tiny_flux_pipe, guidance_scale=7.0)
    traj = rollout(bb, prompts, 3, H, W, generator=torch.Generator().manual_seed(0))
    ref7 = _pipe_images(tiny_flux_pipe, prompts, 3, H, W, 0, output_type="latent", guidance_scale=7.0)
    ref35 = _pipe_images(tiny_flux_pipe, prompts, 3, H, W, 0, output_type="latent", guidance_scale=3.5)
    torch.testing.assert_close(traj.sample, ref7, rtol=0, atol=1e-5)
    assert (ref7 - ref35).abs().max() > 1e-4  # the guidance embedding matters in this model


def test_rollout_sigmas_match_pipeline_scheduler(tiny_flux_pipe, prompts):
    bb = FluxBackbone(tiny_flux_pipe)
    traj = rollout(bb, prompts[:1], STEPS, H, W, generator=torch.Generator().manual_seed(0))
    _pipe_images(tiny_flux_pipe, prompts[:1], STEPS, H, W, 0, output_type="latent")
    assert torch.equal(traj.sigmas, tiny_flux_pipe.scheduler.sigmas.to(torch.float32))
    # dynamic shift: 16 tokens with base_image_seq_len=4, max_image_seq_len=64 -> mu != base_shift
    cfg = tiny_flux_pipe.scheduler.config
    mu = schedule.dynamic_shift_mu(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert mu != pytest.approx(cfg.base_shift)
    assert torch.equal(traj.sigmas, schedule.flow_sigmas(STEPS, mu=mu))


def test_trajectory_states_and_velocities(tiny_flux_pipe, prompts):
    bb = FluxBackbone(tiny_flux_pipe)
    traj = rollout(bb, prompts, 4, H, W, generator=torch.Generator().manual_seed(9), keep_velocities=True)
    b = len(prompts)
    assert traj.num_steps == 4
    assert traj.states.shape == (5, b, 16, 16) and traj.velocities.shape == (4, b, 16, 16)
    assert traj.sigmas[-1].item() == 0.0
    noise = bb.initial_noise(b, H, W, torch.Generator().manual_seed(9))
    assert torch.equal(traj.states[0], noise)
    for i in range(4):
        expected = schedule.euler_step(traj.states[i], traj.velocities[i], traj.sigmas[i], traj.sigmas[i + 1])
        assert torch.equal(traj.states[i + 1], expected)
        with torch.no_grad():
            v = bb.velocity(traj.states[i], traj.sigmas[i], traj.cond)
        torch.testing.assert_close(v, traj.velocities[i], rtol=0, atol=1e-6)
    assert not traj.states.requires_grad


def test_rollout_with_given_noise_matches_pipeline_latents_argument(tiny_flux_pipe_merged, prompts):
    bb = FluxBackbone(tiny_flux_pipe_merged)
    noise = torch.randn(len(prompts), 16, 16, generator=torch.Generator().manual_seed(11))
    traj = rollout(bb, prompts, 3, H, W, noise=noise)
    with torch.no_grad():
        ref = tiny_flux_pipe_merged(prompts, height=H, width=W, num_inference_steps=3, latents=noise,
                                    output_type="latent").images
    assert torch.equal(traj.states[0], noise)
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)


def test_repeated_and_duplicate_prompts_use_the_cache_consistently(tiny_flux_pipe):
    bb = FluxBackbone(tiny_flux_pipe)
    p = ["a red circle", "a blue square", "a red circle"]
    traj = rollout(bb, p, 3, H, W, generator=torch.Generator().manual_seed(0))
    ref = _pipe_images(tiny_flux_pipe, p, 3, H, W, 0, output_type="latent")
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)
    cond = bb.encode_prompts(p)
    assert torch.equal(cond.batch["embeds"][0], cond.batch["embeds"][2])
    assert not torch.equal(cond.batch["embeds"][0], cond.batch["embeds"][1])


# ---------------------------------------------------------------- padding merge


def test_padding_merge_happens_only_for_windowed_t5(tiny_flux_pipe, tiny_flux_pipe_merged, prompts):
    cond = FluxBackbone(tiny_flux_pipe).encode_prompts(prompts)
    assert "text_bias" not in cond.batch and cond.batch["embeds"].shape[1] == 512
    cond_m = FluxBackbone(tiny_flux_pipe_merged).encode_prompts(prompts)
    assert "text_bias" in cond_m.batch
    t = cond_m.batch["embeds"].shape[1]
    assert t < 32
    assert cond_m.batch["text_bias"].shape == (len(prompts), t)
    torch.testing.assert_close(cond_m.batch["text_bias"][:, -1], torch.full((len(prompts),), math.log(512 - t + 1)))
    assert torch.count_nonzero(cond_m.batch["text_bias"][:, :-1]) == 0


def test_merged_velocity_equals_unmerged_velocity(tiny_flux_pipe_merged, prompts):
    merged = FluxBackbone(tiny_flux_pipe_merged, merge_padding=True)
    full = FluxBackbone(tiny_flux_pipe_merged, merge_padding=False)
    x = torch.randn(len(prompts), 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vm = merged.velocity(x, torch.tensor(0.6), merged.encode_prompts(prompts))
        vf = full.velocity(x, torch.tensor(0.6), full.encode_prompts(prompts))
    torch.testing.assert_close(vm, vf, rtol=0, atol=1e-5)


def test_merge_identical_padding_unit():
    torch.manual_seed(0)
    e = torch.randn(2, 10, 4)
    e[0, 6:] = e[0, -1]  # trailing run of 4 identical rows
    e[1, 4:] = e[1, -1]  # trailing run of 6 identical rows
    out, bias = merge_identical_padding(e)
    # keep = 10 - min(4, 6) + 1 = 7 rows; the last one stands for 4 rows
    assert out.shape == (2, 7, 4)
    assert torch.equal(out, e[:, :7])
    torch.testing.assert_close(bias[:, -1], torch.full((2,), math.log(4)))
    assert torch.count_nonzero(bias[:, :-1]) == 0
    # nothing to merge
    f = torch.randn(2, 5, 4)
    out2, bias2 = merge_identical_padding(f)
    assert bias2 is None and torch.equal(out2, f)


def test_pack_unpack_roundtrip_non_square():
    z = torch.randn(2, 4, 6, 10)
    x = pack_latents(z)
    assert x.shape == (2, 15, 16)
    assert torch.equal(unpack_latents(x, 6, 10), z)


# ---------------------------------------------------------------- resolution checks


@pytest.mark.parametrize("hw", [(18, 16), (16, 18), (16, 6), (0, 16), (16, -4), (2, 2)])
def test_check_resolution_rejects_bad_sizes(tiny_flux_pipe, hw):
    bb = FluxBackbone(tiny_flux_pipe)
    with pytest.raises(ValueError, match=r"multiple of 4"):
        bb.check_resolution(*hw)


@pytest.mark.parametrize("hw", [(4, 4), (16, 16), (8, 32), (720, 720)])
def test_check_resolution_accepts_good_sizes(tiny_flux_pipe, hw):
    FluxBackbone(tiny_flux_pipe).check_resolution(*hw)


def test_check_resolution_message_names_the_size(tiny_flux_pipe):
    with pytest.raises(ValueError) as e:
        FluxBackbone(tiny_flux_pipe).check_resolution(18, 16)
    assert "18x16" in str(e.value) and "16x16" in str(e.value)
