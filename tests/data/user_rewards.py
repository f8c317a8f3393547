"""Rewards a user might write, good and bad, for the plug-in tests."""


def redness(images, prompts):
    """Mean of the red channel minus the others: differentiable, prompt-agnostic."""
    return (images[:, 0] - 0.5 * images[:, 1] - 0.5 * images[:, 2]).flatten(1).mean(1)


def wrong_shape(images, prompts):
    return images.mean()


def not_finite(images, prompts):
    return images.flatten(1).mean(1) * float("nan")


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def nan_on_poison(images, prompts):
    """Finite except for the prompt "poison", whose images score NaN (tests the non-finite guard)."""
    r = images.flatten(1).mean(1)
    return r * (1 + 0 * r) + r.new_tensor([float("nan") if p == "poison" else 0.0 for p in prompts])


def nan_when_training(images, prompts):
    """Finite in the no-gradient preflight and evaluations, NaN on every training sample."""
    r = images.flatten(1).mean(1)
    return r * float("nan") if images.requires_grad else r


def not_red(images, prompts):
    """The opposite of `redness`: a judge that falls exactly as a run trained on redness hacks its way up."""
    return -redness(images, prompts)


def pickscore_like(images, prompts):
    """Values on PickScore's published scale (100 cos, about 22), differentiable: a margin of 0.4 is below all of them."""
    return 22.0 + images.flatten(1).mean(1)
