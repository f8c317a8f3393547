"""Peak memory and seconds of one training step versus rollout length (10, 25, 50 steps).

LeapAlign's surrogate re-runs two model calls whatever the rollout length; full
back-propagation through the sampler (the naive reference, AlignProp without checkpointing)
keeps every step's activations.  Each (method, steps) cell runs in a fresh process so that
the peak is its own: on CPU the peak resident set size above the post-load baseline, on CUDA
torch.cuda.max_memory_allocated.

    python benchmarks/memory_vs_steps.py [--model PATH] [--batch 8] [--height 32 --width 32]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def one_step(method: str, steps: int, model: str, batch: int, height: int, width: int, dtype: str) -> dict:
    import torch

    from leapalign.backbones import load_backbone
    from leapalign.config import ModelConfig
    from leapalign.methods.leapalign import leap_surrogate
    from leapalign.rollout import rollout
    from leapalign import schedule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(ModelConfig(path=model, height=height, width=width, dtype=dtype), device)
    tr = backbone.transformer
    tr.requires_grad_(True)
    prompts = ["a red circle to the left of a blue square"] * batch
    backbone.encode_prompts(prompts)
    toy_reward = lambda img: img.flatten(1).mean(1)  # noqa: E731  the reward's own cost is not what is measured

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
    if method == "leapalign":
        traj = rollout(backbone, prompts, steps, height, width, generator=gen)
        x = traj.sample.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(toy_reward(backbone.decode(x, height, width)).sum(), x)
        s = leap_surrogate(backbone, traj, 0, steps // 2, alpha=0.3, tau=0.1, weighting=True)
        torch.autograd.backward(s.endpoint, g)
    else:  # full back-propagation through every sampling step
        cond = backbone.encode_prompts(prompts)
        x = backbone.initial_noise(batch, height, width, gen)
        sig = backbone.sigmas(steps, height, width)
        for i in range(steps):
            x = schedule.euler_step(x, backbone.velocity(x, sig[i], cond), sig[i], sig[i + 1])
        toy_reward(backbone.decode(x, height, width)).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb()
    return {"method": method, "steps": steps, "peak_mb": peak - base, "seconds": time.time() - t0, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapeworld")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="leapalign,full_backprop")
    ap.add_argument("--steps", default="10,25,50")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_leapalign.md"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(one_step(args._child[0], int(args._child[1]), args.model, args.batch, args.height, args.width, args.dtype)))
        return
    rows = []
    for method in args.methods.split(","):
        for n in [int(s) for s in args.steps.split(",")]:
            cmd = [sys.executable, __file__, "--_child", method, str(n), "--model", args.model, "--batch", str(args.batch),
                   "--height", str(args.height), "--width", str(args.width), "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(f"{method:14s} {n:3d} steps: peak +{rows[-1]['peak_mb']:8.1f} MB  {rows[-1]['seconds']:6.2f} s", flush=True)
    steps = sorted({r["steps"] for r in rows})
    lines = [f"# Peak memory of one training step vs rollout length\n",
             f"Model `{args.model}`, batch {args.batch}, {args.height}x{args.width}, {args.dtype}, device {rows[0]['device']}.",
             f"Command: `python benchmarks/memory_vs_steps.py --model {args.model} --batch {args.batch} --height {args.height} --width {args.width} --dtype {args.dtype}`\n",
             "| method | " + " | ".join(f"{n} steps: peak MB / s" for n in steps) + f" | peak ratio {steps[-1]}/{steps[0]} |",
             "|---|" + "---|" * (len(steps) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["steps"]: r for r in rows if r["method"] == method}
        ratio = cells[steps[-1]]["peak_mb"] / max(cells[steps[0]]["peak_mb"], 1e-9)
        lines.append(f"| {method} | " + " | ".join(f"{cells[n]['peak_mb']:.1f} / {cells[n]['seconds']:.2f}" for n in steps) + f" | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
