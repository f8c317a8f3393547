"""Sampling and scoring shared by `leapalign eval`, the trainer's before/after evaluation and the benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .rewards import scores


# "set:name" prompt sets -> rows(name) [{"prompt", "seed"?, "tag"?}]; plug-ins add theirs (ShapeWorld: shapeworld:train|eval)
PROMPT_SETS: dict[str, Callable[[str], list[dict]]] = {}


def load_prompt_rows(spec: str) -> list[dict]:
    """Rows {"prompt", "seed"[, "tag"]} from a registered prompt set ("shapeworld:eval") or a text file (one prompt a line)."""
    prefix, _, name = spec.partition(":")
    if name and prefix in PROMPT_SETS:
        try:
            rows = PROMPT_SETS[prefix](name)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist (use a text file with one prompt a line, or shapeworld:train / shapeworld:eval)")
        rows = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise UserError(f"prompt file {path} has no prompts")
    return [{**r, "seed": r.get("seed", i)} for i, r in enumerate(rows)]


def noise_for_seeds(backbone, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One noise tensor per seed, each drawn as the pipeline would for a batch of one."""
    return torch.cat([backbone.initial_noise(1, height, width, torch.Generator(backbone.device).manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(backbone, prompts: list[str], seeds: list[int], num_steps: int, height: int, width: int, batch_size: int = 96,
                   progress: bool = False) -> torch.Tensor:
    """The rollouts' final latents x_N; sample i depends only on (prompt i, seed i)."""
    from .rollout import rollout

    out = []
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling", leave=False)
    for i in chunks:
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        out.append(rollout(backbone, p, num_steps, height, width, noise=noise_for_seeds(backbone, s, height, width)).sample)
    return torch.cat(out)


@torch.no_grad()
def generate(backbone, prompts: list[str], seeds: list[int], num_steps: int, height: int, width: int, batch_size: int = 96,
             progress: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1]; image i depends only on (prompt i, seed i)."""
    latents = sample_latents(backbone, prompts, seeds, num_steps, height, width, batch_size, progress)
    return torch.cat([backbone.decode(latents[i : i + batch_size], height, width).float().cpu()
                      for i in range(0, len(prompts), batch_size)])


@torch.no_grad()
def reward_values(fn, images: torch.Tensor, prompts: list[str], chunk: int = 256) -> torch.Tensor:
    """(B,) a reward's values on CPU, scored `chunk` images at a time."""
    return torch.cat([scores(fn, images[j : j + chunk], prompts[j : j + chunk])[0].detach().float().cpu()
                      for j in range(0, len(prompts), chunk)])


@torch.no_grad()
def score(images: torch.Tensor, prompts: list[str], reward=None, judges=None) -> dict:
    """{"reward": mean, "rewards": per image, "judges": {name: value}} for whatever applies.

    `reward` is one reward or a dict {name: reward}; with a dict, "reward"/"rewards" are the
    first one's and "scores" / "per_image" hold every one by name.  `judges`: a `judges.Judges`.
    """
    result: dict = {"num_images": len(prompts)}
    named = reward if isinstance(reward, dict) else ({"reward": reward} if reward is not None else {})
    for i, (name, fn) in enumerate(named.items()):
        r = reward_values(fn, images, prompts)
        if i == 0:
            result["reward"], result["rewards"] = r.mean().item(), r.tolist()
        if isinstance(reward, dict):
            result.setdefault("scores", {})[name] = r.mean().item()
            result.setdefault("per_image", {})[name] = r.tolist()
    if judges is not None and judges.fns:
        result["judges"] = judges(images, prompts)
    return result


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (every tag of an ordered prompt set gets its share)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


class Evaluator:
    """Held-out sampling and scoring, one object for the trainer (before, every `eval.every` steps, after) and
    `leapalign eval`: the same rows, seeds, sampler and scores, so their numbers are comparable.

    `reward` is one reward (the run's own: "reward") or a dict {name: reward} ("scores"); `judges` a `judges.Judges`.
    """

    def __init__(self, rows: list[dict], num_steps: int, height: int, width: int, batch_size: int = 96, num_images: int = 0,
                 reward=None, judges=None, grid_size: int = 24):
        self.rows = spread(rows, num_images) if num_images else list(rows)
        self.prompts = [r["prompt"] for r in self.rows]
        self.num_steps, self.height, self.width, self.batch_size = num_steps, height, width, batch_size
        self.reward, self.judges, self.grid_size = reward, judges, grid_size

    def __call__(self, backbone, progress: bool = False) -> tuple[dict, torch.Tensor]:
        """(scores, images): every row sampled from its own seed with the pipeline's sampler, then scored."""
        images = generate(backbone, self.prompts, [r["seed"] for r in self.rows], self.num_steps, self.height, self.width,
                          self.batch_size, progress)
        return score(images, self.prompts, self.reward, self.judges), images

    def save_grid(self, images: torch.Tensor, path: Path, title: str = "") -> None:
        """`grid_size` of the images, evenly over the prompt set (every tag gets its share), with their prompts."""
        pick = spread(list(range(len(images))), self.grid_size)
        save_grid(images[pick], [self.prompts[i] for i in pick], path, title=title)


def save_grid(images: torch.Tensor, prompts: list[str], path: Path, title: str = "", cols: int = 6) -> None:
    """A PNG grid of images with their prompts underneath (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    n = len(images)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, p in zip(axes.flat, images, prompts):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(p, 22)), fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
