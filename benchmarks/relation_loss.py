"""Does a ShapeWorld base use the relation word at all?  Its flow-matching loss with the true caption against the flipped one.

`position` training scenes are noised at fixed noise levels (the same noise for both captions) and the model's
velocity loss is computed with the scene's own caption ("a red square to the left of a cyan circle") and with
its relation flipped ("... to the right of ..."). A model that reads the word predicts the true scene better,
mostly at the noisy levels where the layout is still undecided: flipped - true > 0, and the flipped caption worse
for most scenes. A relation-blind model gives 0 and 50%. This looks at the training signal itself, where
`layout_shift.py` looks at the samples.

The first row is the data's own answer: the gap a perfect model would have at sigma -> 1, where the best
prediction is the caption's mean latent, so the flip costs || E[x0 | caption] - E[x0 | flipped] ||^2 per element
(from `--bayes-scenes` scenes grouped by caption, less the means' sampling variance). A model whose gap at the
noisiest level stays far below it misses a signal that the data holds.

    python benchmarks/relation_loss.py --models shapeworld /path/to/another/base     # -> results/relation_loss.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from leapalign import config
from leapalign.backbones import load_backbone
from leapalign.shapeworld import world
from leapalign.shapeworld.pretrain import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.97)


def position_scenes(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """n random `position` training scenes, drawn as pretraining draws them: captions and images (n, 3, 32, 32) in [0, 1]."""
    captions, images = make_dataset(n, seed, {t: float(t == "position") for t in world.TAGS})
    return captions, images / 2 + 0.5


@torch.no_grad()
def loss_gap(backbone, captions: list[str], images: torch.Tensor, seed: int = 0) -> list[tuple[float, float, float]]:
    """(sigma, true-caption loss, mean of flipped - true, share of scenes the flip makes worse) per noise level."""
    flipped = [world.flip_relation(c) for c in captions]
    x0 = backbone.encode_images(images)
    cond_true = backbone.at_resolution(backbone.encode_prompts(captions), 32, 32)
    cond_flip = backbone.at_resolution(backbone.encode_prompts(flipped), 32, 32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for s in SIGMAS:
        sigma = torch.full((len(captions),), s)
        xt = (1 - s) * x0 + s * noise
        per_scene = lambda cond: ((backbone.velocity(xt, sigma, cond) - (noise - x0)) ** 2).mean((1, 2))  # noqa: E731
        true, flip = per_scene(cond_true), per_scene(cond_flip)
        rows.append((s, true.mean().item(), (flip - true).mean().item(), (flip > true).float().mean().item()))
    return rows


@torch.no_grad()
def bayes_gap(backbone, n: int, seed: int) -> tuple[float, float, float, int]:
    """(mean Bayes-optimal gap at sigma 1, its standard error, the true caption's loss there, captions used).

    Per caption c with >= 5 scenes whose flip has >= 5 too: the squared distance between the two captions'
    mean latents per element, less each mean's sampling variance (unbiased); the loss is E var(x0 | c).
    Latents are `backbone`'s VAE's (every ShapeWorld base shares the shipped VAE, so the row holds for all).
    """
    captions, images = position_scenes(n, seed)
    x0 = torch.cat([backbone.encode_images(images[i : i + 1000]) for i in range(0, n, 1000)]).flatten(1)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    gaps, losses = [], []
    for c, rows in groups.items():
        other = groups.get(world.flip_relation(c), [])
        if len(rows) < 5 or len(other) < 5:
            continue
        a, b = x0[rows], x0[other]
        gaps.append(((a.mean(0) - b.mean(0)) ** 2).mean() - a.var(0).mean() / len(a) - b.var(0).mean() / len(b))
        losses.append(a.var(0).mean())
    if not gaps:
        raise SystemExit(f"--bayes-scenes {n} is too few: no caption and its flip have 5 scenes each (use 30000)")
    g = torch.stack(gaps)
    return g.mean().item(), (g.std() / len(g) ** 0.5).item() if len(g) > 1 else float("nan"), torch.stack(losses).mean().item(), len(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapeworld"], help="ShapeWorld pipeline folders ('shapeworld': the shipped base)")
    ap.add_argument("--scenes", type=int, default=384)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--bayes-scenes", type=int, default=30000, help="scenes for the Bayes-optimal row (0: leave it out)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relation_loss.md")
    args = ap.parse_args()

    captions, images = position_scenes(args.scenes, args.seed)
    lines = ["# Does the base use the relation word? Flow-matching loss, true caption against the relation flipped", "",
             f"`python benchmarks/relation_loss.py --models {' '.join(args.models)} --scenes {args.scenes}` "
             f"({args.scenes} `position` training scenes, the same noise for both captions; guidance 1 for distilled bases)", "",
             "| model | sigma | loss (true caption) | flipped - true | scenes worse under the flip |", "|---|---|---|---|---|"]
    for k, model in enumerate(args.models):
        backbone = load_backbone(config.load(None, [f"model.path={model}", "model.guidance_scale=1.0"]).model)
        if k == 0 and args.bayes_scenes:
            gap, err, loss, pairs = bayes_gap(backbone, args.bayes_scenes, args.seed + 1)
            lines.append(f"| Bayes-optimal, from {args.bayes_scenes} scenes ({pairs} captions) | 1 | {loss:.4f} | {gap:+.4f} ± {err:.4f} | |")
            print(lines[-1], flush=True)
        for s, true, gap, worse in loss_gap(backbone, captions, images):
            lines.append(f"| {model} | {s} | {true:.4f} | {gap:+.4f} | {worse:.2f} |")
        print("\n".join(lines[-len(SIGMAS):]), flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
