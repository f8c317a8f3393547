"""The GPU check that grades `leapalign plan`: for each row that fits one GPU, the plan (fake tensors, on the CPU)
and the same training iteration run for real on the GPU (`Run.train_step`, random weights built from the same
shipped architecture configs, bf16), side by side: torch.cuda.max_memory_allocated against the plan's traced peak,
seconds per iteration against the estimate.  Each row runs in a fresh process, so its peak is its own.

    python benchmarks/gpu_check.py            # one H100 / H200, under 8 minutes -> benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --tiny     # the same code on the shipped ShapeWorld base on the CPU (the tests run it)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FLUX = ["model.path=black-forest-labs/FLUX.1-dev", "model.dtype=bfloat16", "reward.fn=hpsv2.1", "train.batch_size=1",
        "train.num_steps=25", "train.gradient_checkpointing=true", "train.prompts=data/hpdv2_train.txt"]
ROWS = {
    "FLUX.1-dev LoRA 512": FLUX + ["model.height=512", "model.width=512"],
    "FLUX.1-dev LoRA 720": FLUX + ["model.height=720", "model.width=720"],
    "FLUX.1-dev full 512, 8-bit AdamW on bf16 weights": FLUX + ["model.height=512", "model.width=512", "train.finetune=full",
                                                                "train.optimizer=adamw8bit", "train.fp32_master=false", "train.ema=null"],
}
TINY = {"ShapeWorld LoRA": ["train.batch_size=2", "train.num_steps=4", "model.attention_backend=native"],
        "ShapeWorld full": ["train.batch_size=2", "train.num_steps=4", "model.attention_backend=native", "train.finetune=full"]}


def one_row(sets: list[str]) -> dict:
    """Plan, then the real iteration on the GPU (or the CPU), in this process."""
    import torch

    from leapalign import config
    from leapalign.plan import CUDA_OVERHEAD, trace_step

    cfg = config.load("configs/shapeworld_leapalign.yaml", sets)
    t0 = time.time()
    plan = trace_step(cfg)
    planned_in = time.time() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    real = trace_step(cfg, fake=False, random_weights=True, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else real.peak
    return {"plan_bytes": plan.peak, "plan_with_overhead": plan.peak + CUDA_OVERHEAD, "measured_bytes": measured,
            "tracked_real_bytes": real.peak, "plan_phase": plan.peak_phase, "real_phase": real.peak_phase, "device": device,
            "seconds_with_load": seconds, "flops": plan.flops, "planned_in_s": planned_in,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = TINY if args.tiny else ROWS
    if args._row is not None:
        print("ROW " + json.dumps(one_row(rows[args._row])))
        return
    out = Path(args.out or f"benchmarks/results/gpu_check{'_tiny' if args.tiny else ''}.md")
    lines = ["# The planner against real iterations", "", f"`python benchmarks/gpu_check.py{' --tiny' if args.tiny else ''}`", "",
             "| row | device | plan (GiB) | measured max allocated (GiB) | plan / measured | tracked real (GiB) | peak phase plan, real | s (incl. build) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        cmd = [sys.executable, __file__, "--_row", name] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            lines.append(f"| {name} | failed: {tail[:200]} | | | | | | |")
        else:
            r = json.loads(line[4:])
            g = 2**30
            lines.append(f"| {name} | {r['gpu']} | {r['plan_bytes'] / g:.2f} | {r['measured_bytes'] / g:.2f} | "
                         f"{r['plan_bytes'] / r['measured_bytes']:.3f} | {r['tracked_real_bytes'] / g:.2f} | {r['plan_phase']}, "
                         f"{r['real_phase']} | {r['seconds_with_load']:.1f} |")
        print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
