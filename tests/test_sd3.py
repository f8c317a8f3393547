"""SD3Backbone + rollout() must reproduce StableDiffusion3Pipeline, classifier-free guidance included."""
from __future__ import annotations

import pytest
import torch

from leapalign.backbones.sd3 import SD3Backbone
from leapalign.rollout import rollout

from conftest import build_tiny_sd3

H = W = 16  # vae_scale_factor 2 x patch 2 -> multiples of 4


def _pipe(pipe, prompts, steps, seed, output_type="latent", h=H, w=W, **kw):
    with torch.no_grad():
        return pipe(prompts, height=h, width=w, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type=output_type, **kw).images


@pytest.mark.parametrize("guidance", [1.0, 4.5], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("steps,seed", [(4, 0), (2, 3)])
def test_rollout_matches_sd3_pipeline(tiny_sd3_pipe, prompts, guidance, steps, seed):
    bb = SD3Backbone(tiny_sd3_pipe, guidance_scale=guidance)
    traj = rollout(bb, prompts, steps, H, W, generator=torch.Generator().manual_seed(seed))
    ref = _pipe(tiny_sd3_pipe, prompts, steps, seed, guidance_scale=guidance)
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.sigmas, tiny_sd3_pipe.scheduler.sigmas, rtol=0, atol=0)
    with torch.no_grad():
        images = bb.decode(traj.sample, H, W)
    torch.testing.assert_close(images, _pipe(tiny_sd3_pipe, prompts, steps, seed, "pt", guidance_scale=guidance), rtol=0, atol=1e-5)


def test_cfg_and_negative_prompt_change_the_sample(tiny_sd3_pipe, prompts):
    """Guards the test above: CFG and the negative prompt must matter in this tiny model."""
    noise = SD3Backbone(tiny_sd3_pipe).initial_noise(len(prompts), H, W, torch.Generator().manual_seed(0))
    a = rollout(SD3Backbone(tiny_sd3_pipe, guidance_scale=1.0), prompts, 3, H, W, noise=noise).sample
    b = rollout(SD3Backbone(tiny_sd3_pipe, guidance_scale=4.5), prompts, 3, H, W, noise=noise).sample
    c = rollout(SD3Backbone(tiny_sd3_pipe, guidance_scale=4.5, negative_prompt="a blue square"), prompts, 3, H, W, noise=noise).sample
    ref_c = _pipe(tiny_sd3_pipe, prompts, 3, 0, guidance_scale=4.5, negative_prompt="a blue square")
    assert (a - b).abs().max() > 1e-3 and (b - c).abs().max() > 1e-3
    torch.testing.assert_close(c, ref_c, rtol=0, atol=1e-5)


def test_rollout_matches_sd3_pipeline_non_square_and_dynamic_shift(prompts):
    pipe = build_tiny_sd3(dynamic_shift=True)
    bb = SD3Backbone(pipe, guidance_scale=3.0)
    traj = rollout(bb, prompts[:2], 3, 16, 24, generator=torch.Generator().manual_seed(1))
    ref = _pipe(pipe, prompts[:2], 3, 1, h=16, w=24, guidance_scale=3.0)
    torch.testing.assert_close(traj.sample, ref, rtol=0, atol=1e-5)
    static = SD3Backbone(build_tiny_sd3()).sigmas(3, 16, 24)
    assert (traj.sigmas - static).abs().max() > 1e-3  # the resolution-dependent shift was applied


def test_gradient_flows_through_guided_velocity(tiny_sd3_pipe, prompts):
    """A step that carries gradient carries CFG: both halves of the doubled batch reach the weights."""
    bb = SD3Backbone(tiny_sd3_pipe, guidance_scale=4.5)
    cond = bb.at_resolution(bb.encode_prompts(prompts), H, W)
    x = bb.initial_noise(len(prompts), H, W, torch.Generator().manual_seed(0))
    w = tiny_sd3_pipe.transformer.proj_out.weight
    w.requires_grad_(True)
    try:
        v = bb.velocity(x, torch.tensor(0.7), cond)
        (g,) = torch.autograd.grad(bb.decode(x - 0.7 * v, H, W).mean(), w)
    finally:
        w.requires_grad_(False)
    assert torch.isfinite(g).all() and g.abs().max() > 0


@pytest.mark.parametrize("hw", [(18, 16), (16, 6), (0, 16)])
def test_sd3_check_resolution(tiny_sd3_pipe, hw):
    with pytest.raises(ValueError, match="multiple of 4"):
        SD3Backbone(tiny_sd3_pipe).check_resolution(*hw)
