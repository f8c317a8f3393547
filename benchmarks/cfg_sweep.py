"""ShapeEval of a ShapeWorld base under real classifier-free guidance, over CFG scales and seed sets.

Picks the CFG scale that guidance distillation (`pretrain --stage distill --cfg-at-default W`) bakes into the
pipeline's default guidance 3.5.  For an undistilled teacher, scale 1 is its plain sampling; on a distilled
model the guidance embedding (at `model.guidance_scale`, default 3.5) is applied in both calls as well.

    python benchmarks/cfg_sweep.py --model <undistilled base> --scales 1,1.5,2,2.5 --seed-sets 0,1,2
"""
from __future__ import annotations

import argparse
import json

import torch

from leapalign import config, evaluation, schedule, shapeworld
from leapalign.backbones import load_backbone


@torch.no_grad()
def cfg_images(backbone, prompts: list[str], seeds: list[int], scale: float, num_steps: int = 28) -> torch.Tensor:
    """The pipeline's Euler sampling with v_u + scale (v_c - v_u) (one call when scale is 1)."""
    cond = backbone.at_resolution(backbone.encode_prompts(prompts), 32, 32)
    uncond = backbone.at_resolution(backbone.encode_prompts([""] * len(prompts)), 32, 32)
    x = evaluation.noise_for_seeds(backbone, seeds, 32, 32)
    sigmas = backbone.sigmas(num_steps, 32, 32)
    for i in range(num_steps):
        v = backbone.velocity(x, sigmas[i], cond)
        if scale != 1:
            v_u = backbone.velocity(x, sigmas[i], uncond)
            v = v_u + scale * (v - v_u)
        x = schedule.euler_step(x, v, sigmas[i], sigmas[i + 1])
    return backbone.decode(x, 32, 32).float()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapeworld", help="a ShapeWorld FluxPipeline folder (default: the shipped base)")
    ap.add_argument("--scales", default="1,1.5,2,2.5,3")
    ap.add_argument("--seed-sets", default="0,1,2", help="seed set s samples prompt row i with seed i + 1000 s")
    ap.add_argument("--limit", type=int, default=0, help="only this many eval prompts, spread over the tags (smoke runs)")
    args = ap.parse_args(argv)
    backbone = load_backbone(config.load(None, [f"model.path={args.model}"]).model)
    rows = evaluation.load_prompt_rows("shapeworld:eval")
    rows = evaluation.spread(rows, args.limit) if args.limit else rows
    prompts = [r["prompt"] for r in rows]
    results = []
    for scale in [float(s) for s in args.scales.split(",")]:
        per_set = [shapeworld.evaluate(cfg_images(backbone, prompts, [r["seed"] + 1000 * int(s) for r in rows], scale), prompts)
                   for s in args.seed_sets.split(",")]
        mean = {k: sum(r[k] for r in per_set) / len(per_set) for k in per_set[0]}
        results.append({"cfg_scale": scale, **mean})
        print(json.dumps({k: round(v, 3) for k, v in results[-1].items()}), flush=True)
    return results


if __name__ == "__main__":
    main()
