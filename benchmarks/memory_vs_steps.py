"""Peak memory and seconds of one training iteration versus rollout length (10, 25, 50 steps).

Every method goes through the trainer's own code (rollout, then `objective.step`: reward gradient, the method's
surrogates), so what is measured is what training costs.  LeapAlign's
surrogate re-runs two model calls whatever the rollout length; AlignProp over the whole
rollout keeps (checkpointed) activations of every step.  Each (method, steps) cell runs in a
fresh process so that its peak is its own: on CPU the peak resident set size above the
post-load baseline, on CUDA torch.cuda.max_memory_allocated above the post-load baseline.

    python benchmarks/memory_vs_steps.py                       # the shipped ShapeWorld base
    python benchmarks/memory_vs_steps.py --model random-large  # a ~60M-parameter random FLUX
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = {  # name -> method options; alignprop back-propagates through the whole rollout
    "leapalign": lambda n: {"name": "leapalign"},
    "alignprop": lambda n: {"name": "alignprop", "truncation": "uniform", "min_k": n},
    "draft_k": lambda n: {"name": "draft_k", "k": 2},
    "drtune": lambda n: {"name": "drtune"},
}


def random_large_pipeline():
    """The ShapeWorld pipeline with a random FLUX transformer of tens of millions of parameters."""
    from diffusers import FluxTransformer2DModel

    from leapalign import shapeworld
    from leapalign.shapeworld import components

    pipe = shapeworld.load_pipeline()
    cfg = {**components.TRANSFORMER_CONFIG, "num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64,
           "num_attention_heads": 8, "axes_dims_rope": (16, 24, 24)}
    pipe.transformer = FluxTransformer2DModel(**cfg)
    return pipe


def one_step(method: str, steps: int, model: str, batch: int, height: int, width: int, dtype: str) -> dict:
    import torch

    from leapalign.backbones import load_backbone
    from leapalign.backbones.flux import FluxBackbone
    from leapalign.config import ModelConfig
    from leapalign.methods import build_method
    from leapalign.rewards import load_reward
    from leapalign.objective import Objective, rollout_for, step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    if model == "random-large":
        backbone = FluxBackbone(random_large_pipeline().to(device, torch_dtype))
    else:
        backbone = load_backbone(ModelConfig(path=model, height=height, width=width, dtype=dtype), device)
    backbone.transformer.requires_grad_(True)
    n_params = sum(p.numel() for p in backbone.transformer.parameters())
    reward = load_reward("shapescore").to(device)
    m = build_method(METHODS[method](steps))
    prompts = ["a red circle to the left of a blue square"] * batch
    backbone.encode_prompts(prompts)

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    t0 = time.time()
    gen = torch.Generator(device).manual_seed(0)
    pairs = torch.Generator().manual_seed(0)
    traj = rollout_for(backbone, m, prompts, steps, height, width, backbone.initial_noise(batch, height, width, gen), pairs)
    step(backbone, Objective(m, reward, lam=1.0), traj, {"pairs": pairs})
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb()
    return {"method": method, "steps": steps, "peak_mb": peak - base, "seconds": time.time() - t0, "device": device,
            "params_m": n_params / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapeworld")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", default="10,25,50")
    ap.add_argument("--out", default=None, help="markdown table to write (default benchmarks/results/memory_<model>.md)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(one_step(args._child[0], int(args._child[1]), args.model, args.batch, args.height, args.width, args.dtype)))
        return
    out_path = Path(args.out or Path(__file__).parent / "results" / f"memory_{Path(args.model).name}.md")
    rows = []
    for method in args.methods.split(","):
        for n in [int(s) for s in args.steps.split(",")]:
            cmd = [sys.executable, __file__, "--_child", method, str(n), "--model", args.model, "--batch", str(args.batch),
                   "--height", str(args.height), "--width", str(args.width), "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} at {n} steps failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(f"{method:14s} {n:3d} steps: peak +{rows[-1]['peak_mb']:8.1f} MB  {rows[-1]['seconds']:6.2f} s", flush=True)
    steps = sorted({r["steps"] for r in rows})
    lines = ["# Peak memory of one training step vs rollout length\n",
             f"Model `{args.model}` ({rows[0]['params_m']:.1f}M transformer parameters), batch {args.batch}, {args.height}x{args.width}, {args.dtype}, device {rows[0]['device']}.",
             f"Command: `python benchmarks/memory_vs_steps.py --model {args.model} --batch {args.batch} --height {args.height} --width {args.width} --dtype {args.dtype}`\n",
             "| method | " + " | ".join(f"{n} steps: peak MB / s" for n in steps) + f" | peak ratio {steps[-1]}/{steps[0]} |",
             "|---|" + "---|" * (len(steps) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["steps"]: r for r in rows if r["method"] == method}
        ratio = cells[steps[-1]]["peak_mb"] / max(cells[steps[0]]["peak_mb"], 1e-9)
        lines.append(f"| {method} | " + " | ".join(f"{cells[n]['peak_mb']:.1f} / {cells[n]['seconds']:.2f}" for n in steps) + f" | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)


if __name__ == "__main__":
    main()
