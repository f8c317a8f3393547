"""How each ShapeWorld reward scores cheap images against truth renders, and how well it ranks truth first.

For every eval prompt (its row seed): the truth render and each hack of `leapalign.shapeworld.hacks`; printed
per reward: the mean score of the truth and of each hack, and the share of prompts where the hack scores below
the truth.  Then whether the reward's gradient at each hack sees the way back to the truth: the first-order
change <grad R(hack), truth - hack> as a share of the true change R(truth) - R(hack) (1 = the gradient sees all
of the gap; near 0 = the value punishes the hack but training by the gradient cannot remove it).  Then truth
versus `world.mismatch` prompts, per tag, and the reward's time per 16 images (forward and backward).

    python benchmarks/reward_hacks.py          # -> results/reward_hacks.md
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from leapalign.rewards import load_reward
from leapalign.shapeworld import hacks, world

ROOT = Path(__file__).resolve().parents[1]


def gradient_share(reward, hack: torch.Tensor, truth: torch.Tensor, prompts: list[str], min_gap: float = 0.05) -> float:
    """The first-order change from the hack towards the truth, <grad R(hack), truth - hack>, over the true change
    R(truth) - R(hack), both summed over the prompts where the hack scores at least `min_gap` below the truth."""
    x = hack.clone().requires_grad_(True)
    r_hack = reward(x, prompts)
    (grad,) = torch.autograd.grad(r_hack.sum(), x)
    with torch.no_grad():
        gap = reward(truth, prompts) - r_hack.detach()
        linear = (grad * (truth - hack)).flatten(1).sum(1)
    keep = gap > min_gap
    return (linear[keep].sum() / gap[keep].sum()).item() if keep.any() else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rewards", nargs="+", default=["shapematch", "shapescore"])
    ap.add_argument("--quick", action="store_true", help="every 12th eval prompt")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reward_hacks.md")
    args = ap.parse_args(argv)
    rows = world.prompt_rows("eval")[:: 12 if args.quick else 1]
    prompts = [r["prompt"] for r in rows]
    truths = [hacks.truth(r["prompt"], r["seed"]) for r in rows]
    images = {"truth": torch.stack([t for t, _ in truths])}
    built = {}  # per hack: the prompts where it could be constructed
    for name, hack in hacks.HACKS.items():
        fakes = [hack(t, objs, random.Random(r["seed"])) for (t, objs), r in zip(truths, rows)]
        built[name] = torch.tensor([f is not None for f in fakes])
        images[name] = torch.stack([(f if f is not None else t).clamp(0, 1) for f, (t, _) in zip(fakes, truths)])
    rng = random.Random(0)
    mismatched = [world.mismatch(p, rng) for p in prompts]
    tags = [r["tag"] for r in rows]
    lines = [f"# Reward hacks ({len(rows)} eval prompts)", "",
             "`python benchmarks/reward_hacks.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "Mean score of the truth render and of each cheap image; in brackets the share of prompts where it scores "
             "below the truth (1.00 = never preferred), over the prompts whose scene leaves room for the hack.", "",
             "| reward | truth | " + " | ".join(hacks.HACKS) + " |", "|" + "---|" * (len(hacks.HACKS) + 2)]
    towards = ["", "The gradient at each cheap image towards its truth render: <grad R(hack), truth - hack> as a share of "
               "R(truth) - R(hack), each summed over the prompts where the hack scores 0.05 or more below the truth (1 = the gradient "
               "sees the whole gap; near 0: the value punishes the hack, but gradient training cannot see how to undo it):", "",
               "| reward | " + " | ".join(hacks.HACKS) + " |", "|" + "---|" * (len(hacks.HACKS) + 1)]
    ranking = ["", "Truth render scored under its prompt above under `world.mismatch(prompt)`, per tag; time per "
               "16 images, forward and backward:", "", "| reward | " + " | ".join(world.TAGS) + " | ms / 16 images |",
               "|" + "---|" * (len(world.TAGS) + 2)]
    for name in args.rewards:
        reward = load_reward(name)
        with torch.no_grad():
            scores = {k: reward(v, prompts) for k, v in images.items()}
            wrong = reward(images["truth"], mismatched)
        cells = [f"{scores['truth'].mean():.3f}"] + [
            f"{scores[h][built[h]].mean():.3f} ({(scores[h] < scores['truth'])[built[h]].float().mean():.2f})" for h in hacks.HACKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        shares = [gradient_share(reward, images[h][built[h]], images["truth"][built[h]], [p for p, b in zip(prompts, built[h]) if b])
                  for h in hacks.HACKS]
        towards.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
        print(towards[-1], flush=True)
        per_tag = [(scores["truth"][[i for i, t in enumerate(tags) if t == tag]] > wrong[[i for i, t in enumerate(tags) if t == tag]]).float().mean().item()
                   for tag in world.TAGS]
        x = images["truth"][:16].clone().requires_grad_(True)
        reward(x, prompts[:16]).sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            reward(x, prompts[:16]).sum().backward()
        ms = (time.perf_counter() - t0) / 3 * 1000
        ranking.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_tag) + f" | {ms:.0f} |")
        print(lines[-1], flush=True)
        print(ranking[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + towards + ranking) + "\n")


if __name__ == "__main__":
    main()
