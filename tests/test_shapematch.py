"""ShapeMatch, the analytic training reward: it ranks truth first, no cheap image beats a truth render, and its
gradient exists where training needs it (base samples, a blank canvas)."""
import random

import numpy as np
import pytest
import torch

from leapalign.rewards import load_reward
from leapalign.shapeworld import hacks, world
from leapalign.shapeworld.shapematch import ShapeMatch

EVAL = world.prompt_rows("eval")


@pytest.fixture(scope="module")
def reward():
    return ShapeMatch()


@pytest.fixture(scope="module")
def base_samples():
    """Decoded samples of the shipped base for six eval prompts (8 steps: enough to draw its usual mistakes)."""
    from leapalign import shapeworld

    pipe = shapeworld.load_pipeline()
    prompts = [r["prompt"] for r in EVAL[::48]]
    images = pipe(prompts, height=32, width=32, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    return images, prompts


def _prompts_of(tags) -> list[tuple[str, int]]:
    return [(r["prompt"], r["seed"]) for r in EVAL if r["tag"] in tags][::4]


def _hack_scores(reward, prompt: str, seed: int, hack) -> tuple[float, float]:
    img, objs = hacks.truth(prompt, seed)
    fake = hack(img, objs, random.Random(seed))
    if fake is None:  # no room for this hack in this scene
        return 1.0, 0.0
    with torch.no_grad():
        s = reward(torch.stack([img, fake.clamp(0, 1)]), [prompt, prompt])
    return s[0].item(), s[1].item()


@pytest.mark.parametrize("name", ["blob", "extra_object", "hedge", "smear", "noise", "blank", "merged"])
def test_no_cheap_image_beats_a_truth_render(reward, name):
    for prompt, seed in _prompts_of(world.TAGS):
        truth, fake = _hack_scores(reward, prompt, seed, hacks.HACKS[name])
        assert fake < truth, (name, prompt, truth, fake)


def test_the_wrong_size_scores_well_below_the_named_size(reward):
    sized = [(r["prompt"], r["seed"]) for r in EVAL if world.parse(r["prompt"]).objects[0].size][:12]
    assert sized
    for prompt, seed in sized:
        truth, fake = _hack_scores(reward, prompt, seed, hacks.wrong_size)
        assert fake < truth - 0.2, (prompt, truth, fake)


def test_gradient_is_finite_and_nonzero_on_a_blank_canvas_and_points_to_the_colour(reward):
    blank = hacks.render([])[None].repeat(2, 1, 1, 1).requires_grad_(True)
    reward(blank, ["a red circle", "a blue square"]).sum().backward()
    g = blank.grad
    assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all()
    # ascent makes the red prompt's image redder (less green and blue) somewhere, and the blue one bluer
    assert g[0, 0].max() > 0 and g[0, 1].min() < 0
    assert g[1, 2].max() > 0 and g[1, 0].min() < 0


def test_gradient_on_base_samples_is_finite_and_nonzero(base_samples):
    images, prompts = base_samples
    x = images.clone().requires_grad_(True)
    r = load_reward("shapematch")(x, prompts)
    r.sum().backward()
    assert r.shape == (len(prompts),) and torch.isfinite(r).all()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).norm(dim=1) > 0).all()


def test_ascent_on_the_pixels_repairs_a_wrong_layout(reward):
    """Followed in pixel space, the gradient draws the requested layout: a wrongly placed pair becomes a right one."""
    from leapalign.shapeworld.shapeeval import check

    prompt = "a red circle to the left of a blue square"
    objs = [world.Shape("circle", "red", 24.0, 16.0, 6.5), world.Shape("square", "blue", 8.0, 16.0, 6.5)]
    x = hacks.render(objs)[None].clone()
    assert not check(x[0].permute(1, 2, 0).numpy(), prompt)
    before = reward(x, [prompt]).item()
    for _ in range(250):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(reward(x, [prompt]).sum(), x)
        x = (x + 0.05 * g / g.abs().max().clamp_min(1e-12)).clamp(0, 1).detach()
    assert reward(x, [prompt]).item() > before + 0.3
    assert check(x[0].permute(1, 2, 0).numpy().astype(np.float32), prompt)


def test_batch_and_single_scoring_agree(reward):
    prompts = [r["prompt"] for r in EVAL[::24]]
    images = world.render_batch(prompts, list(range(len(prompts))))
    with torch.no_grad():
        batch = reward(images, prompts)
        one = torch.cat([reward(images[i:i + 1], prompts[i:i + 1]) for i in range(len(prompts))])
    torch.testing.assert_close(batch, one)


def test_a_prompt_outside_the_grammar_is_a_clear_error(reward):
    from leapalign.errors import UserError

    with pytest.raises(UserError, match="reads ShapeWorld prompts only.*not a ShapeWorld prompt"):
        reward(world.render_batch(["a red circle"]), ["a photo of a cat"])
