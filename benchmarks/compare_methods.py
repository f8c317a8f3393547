"""Every method on equal terms on ShapeWorld: same base, reward, prompts, rollout budget and seeds.

Each (variant, seed) is one `leapalign train` run in its own process (so its peak memory is its
own), all with the demo's settings unless overridden.  Writes `methods.md` (mean +/- std over
seeds of the held-out training reward and every judge after training, ShapeEval per tag, seconds per
iteration, peak memory) and
`methods.png` (training reward versus iteration and versus wall-clock, and the first judge on the held-out
prompts versus iteration, bands over seeds); the table ends with the iteration at which LeapAlign reaches each
other method's final held-out judge value.

    python benchmarks/compare_methods.py                     # all methods and ablations, 3 seeds
    python benchmarks/compare_methods.py --variants leapalign,refl --seeds 0,1,2 --steps 60
    python benchmarks/compare_methods.py --jobs 2            # two runs at a time, one thread each
    python benchmarks/compare_methods.py --variants leapalign,leapalign_alpha0 --name ablations   # -> ablations.md
    python benchmarks/compare_methods.py --quick             # smoke test in one process: 2 steps, 1 seed, tiny eval
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "shapeworld_leapalign.yaml"

# name -> --set overrides; the baselines with their defaults, then LeapAlign's ablations.
VARIANTS: dict[str, list[str]] = {
    "leapalign": ["method.name=leapalign"],
    "refl": ["method.name=refl"],
    "draft_lv": ["method.name=draft_lv"],
    "draft_k": ["method.name=draft_k", "method.k=2"],
    "drtune": ["method.name=drtune"],
    "alignprop": ["method.name=alignprop"],
    "flowbp_sparse": ["method.name=flowbp_sparse"],
    "leapalign_alpha0": ["method.name=leapalign", "method.alpha=0"],
    "leapalign_alpha1": ["method.name=leapalign", "method.alpha=1"],
    "leapalign_noweight": ["method.name=leapalign", "method.weighting=false"],
    "leapalign_latehalf": ["method.name=leapalign", "method.window=0.5,1"],
    "leapalign_gap1": ["method.name=leapalign", "method.fixed_gap=1"],
}
TAGS = ["single_object", "two_objects", "counting", "colors", "position", "color_attr"]


def run_one(variant: str, seed: int, work: Path, extra: list[str], in_process: bool = False, threads: int = 0,
            reuse: bool = False) -> dict:
    """One training run; in its own process unless `in_process` (the smoke test: no per-run start-up cost).

    `reuse`: a finished run already in `work` (its summary.json written) is read, not run again.
    """
    out = work / f"{variant}_seed{seed}"
    overrides = [*VARIANTS[variant], f"train.seed={seed}", f"output.dir={out}", "output.tensorboard=false", "output.overwrite=true", *extra]
    if reuse and (out / "summary.json").exists():
        print(f"{variant} seed {seed}: reusing the finished run in {out}", flush=True)
    elif in_process:
        from leapalign import config
        from leapalign.train import train

        train(config.load(PRESET, overrides), progress=False)
    else:
        cmd = [sys.executable, "-m", "leapalign", "train", "--config", str(PRESET)]
        for item in overrides:
            cmd += ["--set", item]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"variant": variant, "seed": seed, "summary": summary, "metrics": metrics}


def fmt(values: list[float], digits: int = 3) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else f"{a[0]:.{digits}f}"


def table(runs: list[dict], command: str) -> str:
    """Mean ± std over seeds after training: the held-out training reward, every judge, ShapeEval per tag."""
    from leapalign.judges import headline

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    base, name = runs[0]["summary"]["before"], runs[0]["summary"].get("reward", "reward")
    judges = list(base.get("judges", {}))
    per_tag = "shapeeval" in judges
    before = ", ".join([f"{name} {base['reward']:.3f}"] + [f"{j} {headline(base['judges'][j]):.3f}" for j in judges])
    lines = ["# Methods compared on ShapeWorld", "", f"Command: `{command}`", "",
             f"Base model before training (held-out): {before}.  Values after training, mean ± std over seeds "
             f"({len({r['seed'] for r in runs})} seeds); s/iter and peak RSS are per training iteration on this machine.", "",
             f"| method | {name} | " + " | ".join(judges) + (" | " + " | ".join(TAGS) if per_tag else "") + " | s/iter | peak MB |",
             "|---|" + "---|" * (len(judges) + (len(TAGS) if per_tag else 0) + 3)]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        after = [r["summary"]["after"] for r in rs]
        secs = [np.mean([m["seconds"] for m in r["metrics"]]) for r in rs]
        peak = max(max(m["peak_memory_mb"] for m in r["metrics"]) for r in rs)
        cells = [fmt([a["reward"] for a in after])] + [fmt([headline(a["judges"][j]) for a in after]) for j in judges]
        if per_tag:
            cells += [fmt([a["judges"]["shapeeval"][t] for a in after], 2) for t in TAGS]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {np.mean(secs):.2f} | {peak:.0f} |")
    if judges and "leapalign" in variants and len(variants) > 1:
        lines += ["", reaches_line(runs, judges[0])]
    return "\n".join(lines) + "\n"


def held_out_curve(rs: list[dict], judge: str) -> tuple[np.ndarray, np.ndarray]:
    """Iterations and the per-seed held-out `judge` headline at before, every eval.every and after: (steps,), (seeds, steps)."""
    from leapalign.judges import headline

    def points(r):
        s = r["summary"]
        return [(0, s["before"])] + [(e["step"], e) for e in s.get("during", [])] + [(s["steps"], s["after"])]

    per_seed = [dict((step, headline(e["judges"][judge])) for step, e in points(r)) for r in rs]
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    return np.array(steps), np.array([[p[t] for t in steps] for p in per_seed])


def reaches_line(runs: list[dict], judge: str) -> str:
    """The iteration at which LeapAlign's mean held-out judge first reaches each other method's final mean."""
    curve = lambda v: held_out_curve([r for r in runs if r["variant"] == v], judge)  # noqa: E731
    steps, vals = curve("leapalign")
    mean = vals.mean(0)
    parts = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        if v == "leapalign":
            continue
        target = curve(v)[1].mean(0)[-1]
        hit = np.nonzero(mean >= target)[0]
        if not len(hit):
            parts.append(f"{v} ({target:.3f}): not reached")
        elif hit[0] == 0:
            parts.append(f"{v} ({target:.3f}): at the base")
        else:  # linear between the evaluation before and the one that reaches it
            i = hit[0]
            at = steps[i - 1] + (target - mean[i - 1]) / (mean[i] - mean[i - 1]) * (steps[i] - steps[i - 1])
            parts.append(f"{v} ({target:.3f}): iteration {at:.0f}")
    return (f"LeapAlign's mean held-out {judge} reaches each method's final mean at (linear between evaluations): "
            + "; ".join(parts) + ".")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(runs[0]["summary"]["before"].get("judges", {}))
    fig, axes = plt.subplots(1, 3 if judges else 2, figsize=(18 if judges else 12, 4.5))
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        n = min(len(r["metrics"]) for r in rs)
        rew = np.array([[m["reward"] for m in r["metrics"][:n]] for r in rs])
        clock = np.array([np.cumsum([m["seconds"] for m in r["metrics"][:n]]) for r in rs]).mean(0)
        k = max(1, n // 10)  # moving average: single-batch rewards are noisy
        smooth = np.array([np.convolve(row, np.ones(k) / k, mode="valid") for row in rew])
        mean, std = smooth.mean(0), smooth.std(0)
        it = np.arange(k, n + 1)
        for ax, x in ((axes[0], it), (axes[1], clock[k - 1:])):
            (line,) = ax.plot(x, mean, label=v, lw=1.5)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if judges:
            steps, vals = held_out_curve(rs, judges[0])
            axes[2].plot(steps, vals.mean(0), marker="o", label=v, lw=1.5, color=line.get_color())
            axes[2].fill_between(steps, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0), color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall-clock seconds")
    for ax in axes[:2]:
        ax.set_ylabel("training reward (moving average)")
    if judges:
        axes[2].set_xlabel("iteration")
        axes[2].set_ylabel(f"held-out {judges[0]} (judge)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="training iterations per run (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra override for every run")
    ap.add_argument("--quick", action="store_true", help="smoke test, in this process: 2 iterations, seed 0, 6 eval images (one per tag) of 2 steps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cpu_count // jobs threads (s/iter is then measured side by side)")
    ap.add_argument("--name", default="methods", help="stem of the written table and plot, e.g. ablations")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep every run's output folder here")
    ap.add_argument("--reuse", action="store_true", help="with --keep-runs: read the runs that already finished there "
                    "instead of running them again (an interrupted benchmark continues)")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = list(args.set)
    if args.quick:
        seeds = seeds[:1]
        extra += ["train.steps=2", "train.batch_size=2", "train.num_steps=4", "eval.num_images=6", "eval.num_steps=2", "eval.grid_size=6"]
    elif args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    work = args.keep_runs or Path(tempfile.mkdtemp(prefix="leapalign_compare_"))
    if args.reuse and args.keep_runs is None:
        raise SystemExit("--reuse reads finished runs from --keep-runs DIR; give that folder too")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0

    from leapalign.judges import headline

    def one(job):
        r = run_one(*job, work, extra, in_process=args.quick, threads=threads, reuse=args.reuse)
        a = r["summary"]["after"]
        judged = "  ".join(f"{n} {headline(v):.3f}" for n, v in a.get("judges", {}).items())
        print(f"{r['variant']:20s} seed {r['seed']}: reward {a['reward']:.3f}  {judged}", flush=True)
        return r

    jobs = [(v, s) for v in variants for s in seeds]
    try:
        if args.jobs == 1 or args.quick:
            runs = [one(j) for j in jobs]
        else:
            with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process; threads only wait on them
                runs = list(pool.map(one, jobs))
    finally:
        if args.keep_runs is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/compare_methods.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = table(runs, command.strip())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.name}_quick" if args.quick else args.name
    (args.out / f"{name}.md").write_text(text)
    plot(runs, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
