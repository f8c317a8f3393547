"""Rewards a user might write, good and bad, for the plug-in tests."""
import torch


def redness(images, prompts):
    """Mean of the red channel minus the others: differentiable, prompt-agnostic."""
    return (images[:, 0] - 0.5 * images[:, 1] - 0.5 * images[:, 2]).flatten(1).mean(1)


def wrong_shape(images, prompts):
    return images.mean()


def not_finite(images, prompts):
    return images.flatten(1).mean(1) * float("nan")
