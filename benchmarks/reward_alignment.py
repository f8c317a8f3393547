"""Does the reward's gradient follow ShapeEval, and does a trained policy follow the reward's gradient?

Two measurements on base samples of the `eval` prompts (the pipeline's 28 steps, the prompt rows' seeds):

1. Reward probe (`--rewards`): normalised gradient ascent of each reward directly on the latent samples x_N,
   through the VAE decoder (each step moves every sample by L2 0.25, about 0.011 RMS per latent element),
   with ShapeEval after 0, 10, 20, 30 steps, and the AUC of ShapeEval-passing over failing samples.  This is
   what the reward would give a policy that could move every sample its own way.
2. Policy drift (`--loras`, judged with the first of `--rewards`): how far a trained LoRA moved the same
   samples (RMS over latent elements) and the cosine of that move with the reward's gradient at the base sample.

    python benchmarks/reward_alignment.py --rewards shapematch shapescore --loras runs/demo/lora   # -> results/reward_alignment.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from leapalign import config, evaluation, shapeworld
from leapalign.backbones import load_backbone
from leapalign.rewards import BUILTIN, load_reward
from leapalign.shapeworld.shapeeval import check

TAGS = list(shapeworld.TAGS)
ASCENT_STEP = 0.25


def base_samples(backbone, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """x_N with the pipeline's default 28 steps, one sample per (prompt, seed)."""
    return evaluation.sample_latents(backbone, prompts, seeds, 28, 32, 32)


def tag_means(values: torch.Tensor, tags: list[str]) -> dict:
    """Mean of `values` over the samples of each tag present."""
    return {t: values[[i for i, x in enumerate(tags) if x == t]].mean().item() for t in TAGS if t in tags}


def judge(images: torch.Tensor, prompts: list[str], tags: list[str]) -> tuple[torch.Tensor, dict]:
    ok = torch.tensor([check(a, p) for a, p in zip(images.permute(0, 2, 3, 1).numpy(), prompts)]).float()
    per = tag_means(ok, tags)
    return ok, {"overall": sum(per.values()) / len(per), **per}


def reward_and_grad(backbone, reward, x: torch.Tensor, prompts: list[str]):
    x = x.detach().requires_grad_(True)
    images = backbone.decode(x, 32, 32)
    r = reward(images, prompts)
    (g,) = torch.autograd.grad(r.sum(), x)
    return r.detach(), g, images.detach()


def gradient_share_of_lowest(r: torch.Tensor, g: torch.Tensor, fraction: float = 0.2) -> float:
    """Share of the batch's squared gradient norm sum_b |dR_b/dx_b|^2 carried by its lowest-scoring `fraction` of
    samples: 0.2 if every sample pulled alike, near 1 if the worst samples set the direction of a batch step
    (what `reward.balance` evens out)."""
    n2 = g.flatten(1).double().pow(2).sum(1)
    low = torch.argsort(r)[: max(1, round(fraction * len(r)))]
    return (n2[low].sum() / n2.sum().clamp_min(1e-300)).item()


def probe(backbone, reward, lat, prompts, tags, checkpoints: list[int]) -> dict:
    rows, x = {}, lat
    for it in range(max(checkpoints) + 1):
        r, g, images = reward_and_grad(backbone, reward, x, prompts)
        if it in checkpoints:
            ok, scores = judge(images, prompts, tags)
            rows[it] = {"reward": r.mean().item(), **scores}
            if it == 0:
                pos, neg = r[ok > 0], r[ok == 0]
                rows["auc"] = (pos[:, None] > neg[None]).float().mean().item() if len(pos) and len(neg) else float("nan")
                rows["low_share"] = gradient_share_of_lowest(r, g)
        x = x + ASCENT_STEP * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rewards", nargs="+", default=["shapematch", "shapescore"],
                    help="built-in reward names (shapematch, shapescore) or ShapeScore folders")
    ap.add_argument("--loras", nargs="*", default=[], help="LoRA folders of trained policies (e.g. runs/demo/lora)")
    ap.add_argument("--seeds", type=int, default=2, help="seed sets of the eval prompts (the rows' seeds + 1000 s)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 12 prompts, 2 ascent steps")
    ap.add_argument("--model", default="shapeworld", help="the base: `shapeworld` (shipped) or a FluxPipeline folder")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward_alignment.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    backbone = load_backbone(config.load(None, [f"model.path={args.model}"]).model)
    rows = shapeworld.prompt_rows("eval")
    rows = rows[:: len(rows) // 12] if args.quick else rows
    prompts = [r["prompt"] for r in rows] * args.seeds
    seeds = [r["seed"] + 1000 * s for s in range(args.seeds) for r in rows]
    tags = [shapeworld.parse(p).tag for p in prompts]
    checkpoints = [0, 1, 2] if args.quick else [0, 10, 20, 30]
    rewards = {d: load_reward(d) if d in BUILTIN else shapeworld.load_reward(d) for d in args.rewards}
    lat = base_samples(backbone, prompts, seeds)

    cols = ["reward", "overall", *TAGS]
    lines = [f"# Reward gradient vs ShapeEval ({len(prompts)} base samples of the eval prompts)", "",
             "`python benchmarks/reward_alignment.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             f"## 1. Latent ascent on the reward (step L2 {ASCENT_STEP} per sample)", "",
             "| reward | AUC pass vs fail | |grad|^2 in lowest fifth | ascent steps | " + " | ".join(cols) + " |",
             "|" + "---|" * (len(cols) + 4)]
    for name, reward in rewards.items():
        res = probe(backbone, reward, lat, prompts, tags, checkpoints)
        for it in checkpoints:
            auc, low = (f"{res['auc']:.3f}", f"{res['low_share']:.2f}") if it == 0 else ("", "")
            lines.append(f"| {name} | {auc} | {low} | {it} | " + " | ".join(f"{res[it][c]:.3f}" for c in cols) + " |")
            print(lines[-1], flush=True)
    if args.loras:
        first = next(iter(rewards.values()))
        _, g, _ = reward_and_grad(backbone, first, lat, prompts)
        lines += ["", f"## 2. Policy drift against the gradient of {args.rewards[0]}", "",
                  "| LoRA | RMS move of x_N | cos(move, dR/dx_N) | " + " | ".join(TAGS) + " |", "|" + "---|" * (len(TAGS) + 3)]
        for lora in args.loras:
            backbone.pipe.load_lora_weights(lora, adapter_name="probe")
            move = base_samples(backbone, prompts, seeds) - lat
            backbone.pipe.unload_lora_weights()
            cos = torch.nn.functional.cosine_similarity(move.flatten(1), g.flatten(1), dim=1)
            rms = move.flatten(1).pow(2).mean(1).sqrt().mean().item()
            per = tag_means(cos, tags)
            lines.append(f"| {lora} | {rms:.4f} | {cos.mean().item():.3f} | " + " | ".join(f"{per[t]:.3f}" for t in TAGS) + " |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
