"""How close `leapalign plan` comes to the real step: plan (fake tensors) against the same step run for real.

Each row traces one `Run.train_step` of the shipped ShapeWorld base twice with the same tracker (`plan.MemoryTrace`):
on fake tensors built from the configs (the plan) and on the real pipeline with its weights (the measurement),
and prints the ratio of the peaks.  On CPU both sides see the tensors torch allocates, so this grades what the fake
trace gets right (shapes, lifetimes, the trainer's code path, the repeated-call shortcut), not the CUDA allocator.

    python benchmarks/plan_accuracy.py                 # -> benchmarks/results/plan_accuracy.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from leapalign import config
from leapalign.plan import trace_step

BASE = ["train.batch_size=4", "model.attention_backend=native"]  # every padded text token, as the plan traces them
ROWS = [
    ("LeapAlign LoRA, T=10", ["train.num_steps=10"]),
    ("LeapAlign LoRA, T=50", ["train.num_steps=50"]),
    ("LeapAlign full, T=10", ["train.num_steps=10", "train.finetune=full"]),
    ("LeapAlign full, T=50", ["train.num_steps=50", "train.finetune=full"]),
    ("AlignProp LoRA, T=10", ["train.num_steps=10", "method.name=alignprop"]),
    ("DRTune LoRA, T=10", ["train.num_steps=10", "method.name=drtune"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/plan_accuracy.md")
    args = ap.parse_args()
    lines = ["# Plan against the real step (shipped ShapeWorld base, CPU)", "",
             "`python benchmarks/plan_accuracy.py`: batch 4, 32x32, float32, one process; the same tracker on both sides.", "",
             "| configuration | plan peak (MiB) | real peak (MiB) | plan / real | peak phase (plan, real) | plan s | real s |",
             "|---|---|---|---|---|---|---|"]
    for label, sets in ROWS:
        cfg = config.load("configs/shapeworld_leapalign.yaml", BASE + sets)
        t0 = time.time()
        plan = trace_step(cfg, fake=True)
        t1 = time.time()
        real = trace_step(cfg, fake=False)
        t2 = time.time()
        row = (f"| {label} | {plan.peak / 2**20:.1f} | {real.peak / 2**20:.1f} | {plan.peak / real.peak:.3f} | "
               f"{plan.peak_phase}, {real.peak_phase} | {t1 - t0:.1f} | {t2 - t1:.1f} |")
        print(row, flush=True)
        lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
