"""Does a ShapeWorld base use the relation word at all?  Its flow-matching loss with the true caption against the flipped one.

`position` training scenes are noised at fixed noise levels (the same noise for both captions) and the model's
velocity loss is computed with the scene's own caption ("a red square to the left of a cyan circle") and with
its relation flipped ("... to the right of ..."). A model that reads the word predicts the true scene better,
mostly at the noisy levels where the layout is still undecided: flipped - true > 0, and the flipped caption worse
for most scenes. A relation-blind model gives 0 and 50%. This looks at the training signal itself, where
`layout_shift.py` looks at the samples.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapeworld"], help="ShapeWorld pipeline folders ('shapeworld': the shipped base)")
    ap.add_argument("--scenes", type=int, default=384)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relation_loss.md")
    args = ap.parse_args()

    captions, images = position_scenes(args.scenes, args.seed)
    lines = ["# Does the base use the relation word? Flow-matching loss, true caption against the relation flipped", "",
             f"`python benchmarks/relation_loss.py --models {' '.join(args.models)} --scenes {args.scenes}` "
             f"({args.scenes} `position` training scenes, the same noise for both captions; guidance 1 for distilled bases)", "",
             "| model | sigma | loss (true caption) | flipped - true | scenes worse under the flip |", "|---|---|---|---|---|"]
    for model in args.models:
        backbone = load_backbone(config.load(None, [f"model.path={model}", "model.guidance_scale=1.0"]).model)
        for s, true, gap, worse in loss_gap(backbone, captions, images):
            lines.append(f"| {model} | {s} | {true:.4f} | {gap:+.4f} | {worse:.2f} |")
        print("\n".join(lines[-len(SIGMAS):]), flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
