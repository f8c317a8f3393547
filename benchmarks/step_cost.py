"""Where a training iteration's time goes, against the rollout alone, measured side by side in one process.

A LeapAlign iteration is a no-gradient rollout of T steps, then `objective.step` (decode, reward gradient, M
pairs of two model calls forward and backward) and the optimiser.  Its floor is about (T + 6 M) / T rollout
steps' worth of model calls plus the reward; this prints how close the trainer's own code gets, what more
pairs per rollout buy, and the same for DRTune and AlignProp (the whole rollout back-propagated).

Each cell is the median of `--reps` iterations after a warm-up, all cells in one process and interleaved
repetition by repetition, so a busy machine slows every cell alike.  The last line is, for scripts,

    ratios: iteration/rollout=X pair_gain=Y

X: a LeapAlign iteration (M = 1) over rollout-only time at T = 25 on the shipped base; Y: pair-updates per
second at M = 4 over M = 1 there.

    python benchmarks/step_cost.py                     # the shipped base -> results/step_cost.md
    python benchmarks/step_cost.py --models random-large --steps 25 --batch 4 --reps 3 --out benchmarks/results/step_cost_random-large.md
    python benchmarks/step_cost.py --quick             # shipped base, T = 25 only, 2 repetitions (the test suite)
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

VARIANTS = {  # label -> method options; "reuse": False = train.reuse_rollout_calls off (the surrogates call the model anew)
    "leapalign M=1": {"name": "leapalign", "pairs_per_rollout": 1},
    "leapalign M=1, calls recomputed": {"name": "leapalign", "pairs_per_rollout": 1, "reuse": False},
    "leapalign M=2": {"name": "leapalign", "pairs_per_rollout": 2},
    "leapalign M=4": {"name": "leapalign", "pairs_per_rollout": 4},
    "drtune": {"name": "drtune"},
    "alignprop (whole rollout)": {"name": "alignprop", "truncation": "uniform", "min_k": 10**6},
    "alignprop (whole rollout), calls recomputed": {"name": "alignprop", "truncation": "uniform", "min_k": 10**6, "reuse": False},
}
PROMPTS = ["a red circle to the left of a blue square", "two yellow squares", "a small green triangle", "a cyan circle above a purple square"]


class Bench:
    """One model with LoRA, its optimiser and a reward; times the phases of an iteration."""

    def __init__(self, model: str, batch: int, device: str, dtype: str, compile: bool = False):
        from leapalign.backbones import load_backbone
        from leapalign.backbones.flux import FluxBackbone
        from leapalign.config import ModelConfig, TrainConfig
        from leapalign.rewards import load_reward
        from leapalign.train import setup_trainable

        if model == "random-large":
            from memory_vs_steps import random_large_pipeline

            self.backbone = FluxBackbone(random_large_pipeline().to(device, getattr(torch, dtype)))
        else:
            self.backbone = load_backbone(ModelConfig(path=model, height=32, width=32, dtype=dtype), device)
        self.params = setup_trainable(self.backbone, TrainConfig(finetune="lora", lora_rank=8, compile=compile))
        self.backbone.transformer.train()
        self.n_params = sum(p.numel() for p in self.backbone.transformer.parameters()) / 1e6
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.reward = load_reward("shapematch").to(device)
        self.prompts = (PROMPTS * batch)[:batch]
        self.device = device
        self.backbone.encode_prompts(self.prompts)  # the trainer caches every prompt's encoding too

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def rollout(self, steps: int, method=None, pairs: torch.Generator | None = None, reuse: bool = True):
        """The trainer's rollout for `method` (None: a plain sampling rollout, nothing kept)."""
        from leapalign.objective import rollout_for
        from leapalign.rollout import rollout

        noise = self.backbone.initial_noise(len(self.prompts), 32, 32, torch.Generator(self.device).manual_seed(0))
        if method is None:
            return rollout(self.backbone, self.prompts, steps, 32, 32, noise=noise)
        return rollout_for(self.backbone, method, self.prompts, steps, 32, 32, noise, pairs, reuse)

    def iteration(self, method, steps: int, reuse: bool = True) -> dict:
        """Seconds of each phase of one training iteration, as the trainer runs it."""
        from leapalign.objective import Objective, reward_gradient, step

        out = {}
        self.sync()
        t0 = time.perf_counter()
        pairs = torch.Generator().manual_seed(0)
        traj = self.rollout(steps, method, pairs, reuse)
        self.sync()
        t1 = time.perf_counter()
        step(self.backbone, Objective(method, self.reward, lam=1.0), traj, {"pairs": pairs})
        self.sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        t3 = time.perf_counter()
        if method.reward_on_sample:  # the decode + reward gradient part of step(), timed again on its own
            reward_gradient(self.backbone, self.reward, traj.sample, traj.prompts, 32, 32, 1.0, 1.0)
            self.sync()
            out["reward"] = time.perf_counter() - t3
        out.update(rollout=t1 - t0, step=t2 - t1, optimiser=t3 - t2, iteration=t3 - t0)
        out["surrogates"] = out["step"] - out.get("reward", 0.0)
        return out

    def rollout_only(self, steps: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.rollout(steps)
        self.sync()
        return time.perf_counter() - t0


def measure(bench: Bench, steps_list: list[int], variants: dict, reps: int) -> list[dict]:
    """Median over `reps` interleaved repetitions of each (T, variant) cell, after one warm-up of each."""
    from leapalign.methods import build_method

    methods = {label: (build_method({k: v for k, v in opts.items() if k != "reuse"}), opts.get("reuse", True))
               for label, opts in variants.items()}
    samples: dict = {}
    for rep in range(reps + 1):
        for T in steps_list:
            t = bench.rollout_only(T)
            if rep:
                samples.setdefault((T, "rollout only"), []).append({"iteration": t, "rollout": t})
            for label, (m, reuse) in methods.items():
                m.check(T)
                r = bench.iteration(m, T, reuse)
                if rep:
                    samples.setdefault((T, label), []).append(r)
    rows = []
    for (T, label), runs in samples.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"T": T, "variant": label, **med})
    return rows


def table(rows: list[dict], title: str) -> list[str]:
    lines = [f"### {title}\n", "| T | variant | s / iteration | x rollout | rollout | reward (decode + grad) | surrogates | optimiser | pair-updates / s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["T"] == r["T"] and x["variant"] == "rollout only")["iteration"]
        phases = [f"{r[k]:.3f}" if k in r else "" for k in ("rollout", "reward", "surrogates", "optimiser")]
        per_s = f"{int(r['variant'].split('M=')[1][0]) / r['iteration']:.2f}" if "M=" in r["variant"] else ""
        lines.append(f"| {r['T']} | {r['variant']} | {r['iteration']:.3f} | {r['iteration'] / base:.2f} | " + " | ".join(phases) + f" | {per_s} |")
    return lines


def ratios(rows: list[dict]) -> tuple[float, float]:
    cell = {(r["T"], r["variant"]): r["iteration"] for r in rows}
    x = cell[(25, "leapalign M=1")] / cell[(25, "rollout only")]
    y = (4 / cell[(25, "leapalign M=4")]) / (1 / cell[(25, "leapalign M=1")])
    return x, y


def main(argv=None) -> tuple[float, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shipped base, T = 25, two repetitions; writes nothing")
    ap.add_argument("--models", default="shapeworld", help="comma-separated: shapeworld (the shipped base), random-large (~70M FLUX)")
    ap.add_argument("--steps", default="10,25,50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="train.compile: the transformer compiled (the warm-up repetition compiles)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost.md"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, steps_list, reps, variants = args.models.split(","), [int(s) for s in args.steps.split(",")], args.reps, VARIANTS
    if args.quick:
        models, steps_list, reps = ["shapeworld"], [25], 2
        variants = {k: v for k, v in VARIANTS.items() if k.startswith("leapalign M=1") or k == "leapalign M=4"}
    lines = ["# Cost of a training iteration against the rollout alone\n",
             f"`python benchmarks/step_cost.py --models {args.models} --steps {args.steps} --batch {args.batch} --reps {args.reps}"
             f"{' --compile' if args.compile else ''}` "
             f"({device}, {args.dtype}, {torch.get_num_threads()} threads; LoRA rank 8, ShapeMatch reward at 32x32, median of "
             f"{args.reps} interleaved repetitions). Columns after 'x rollout' split one iteration into its phases, in seconds.\n"]
    first = None
    for model in models:
        bench = Bench(model, args.batch, device, args.dtype, args.compile)
        rows = measure(bench, steps_list, variants, reps)
        first = first or rows
        lines += table(rows, f"{model} ({bench.n_params:.1f}M transformer parameters), batch {args.batch}") + [""]
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
        if not args.quick:  # written after each model: a long run keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    x, y = ratios(first) if (25, "leapalign M=4") in {(r["T"], r["variant"]) for r in first} else (float("nan"), float("nan"))
    lines.append(f"ratios: iteration/rollout={x:.3f} pair_gain={y:.3f}")
    if not args.quick:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return x, y


if __name__ == "__main__":
    main()
