"""Does a method change layout (early steps) or only appearance (late steps)?  The paper's early-step claim, measured.

For the same initial noise (the eval rows' seeds), the base's and each tuned model's samples are compared
object by object: ShapeEval's detections of the same colour are paired (nearest centroids) and their centroid
displacement averaged; "moved" is the share of samples with an object displaced by more than 3 pixels (the
relation margin ShapeEval uses).  Printed beside it: ShapeEval's `position` accuracy, split into its two parts
(both objects drawn as asked, anywhere, and the share of those in the stated relation), and overall.  Last, whether
the layout follows the relation word at all: each position prompt is sampled again with its relation flipped
("left of" <-> "right of"), same noise; a model that ignores the word draws the same layout, so the pair's offsets
in the two stated directions cancel.  The column is the share of pairs (drawn under both words) whose offsets sum
to more than 3 pixels.

    python benchmarks/layout_shift.py --loras leapalign=runs/a/lora refl=runs/b/lora     # -> results/layout_shift.md

A NAME given several times (one LoRA per seed) is one row: mean ± std over its LoRAs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from leapalign import config, evaluation, shapeworld
from leapalign.backbones import load_backbone
from leapalign.shapeworld.shapeeval import detect, position_parts, relation_offset

from compare_methods import fmt  # mean ± std over seeds, as in the methods table (benchmarks/ is on the path)

ROOT = Path(__file__).resolve().parents[1]


def displacements(base: np.ndarray, tuned: np.ndarray) -> list[float]:
    """Centroid shifts (pixels) of the objects found in both images, paired by colour and nearest centroid."""
    a, b = detect(base), detect(tuned)
    shifts = []
    for d in a:
        same = [e for e in b if e.color == d.color]
        if same:
            shifts.append(min(float(np.hypot(d.cx - e.cx, d.cy - e.cy)) for e in same))
    return shifts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loras", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--quick", action="store_true", help="every 12th eval prompt, 8 sampling steps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layout_shift.md")
    args = ap.parse_args(argv)
    rows = shapeworld.prompt_rows("eval")[:: 12 if args.quick else 1]
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    steps = 8 if args.quick else 28
    backbone = load_backbone(config.load(None, []).model)

    def sample() -> np.ndarray:
        return evaluation.generate(backbone, prompts, seeds, steps, 32, 32).permute(0, 2, 3, 1).numpy()

    base = sample()
    positional = [i for i, p in enumerate(prompts) if shapeworld.world.parse(p).tag == "position"]
    flipped = [shapeworld.world.flip_relation(prompts[i]) for i in positional]

    def follows_relation(images: np.ndarray) -> float:
        """Share of position pairs whose layout moves with the relation word (offsets summed over the flip > 3 px)."""
        again = evaluation.generate(backbone, flipped, [seeds[i] for i in positional], steps, 32, 32).permute(0, 2, 3, 1).numpy()
        both = [(relation_offset(images[i], prompts[i]), relation_offset(f, p)) for i, f, p in zip(positional, again, flipped)]
        sums = [a + b for a, b in both if a is not None and b is not None]
        return float(np.mean([s > 3.0 for s in sums])) if sums else float("nan")

    def scores(images: np.ndarray) -> tuple[float, float, float, float]:
        """ShapeEval position, both objects drawn (share of position prompts), relation right when both are, overall."""
        parts = np.array([position_parts(images[i], prompts[i]) for i in positional], dtype=float).reshape(-1, 2)
        both = parts[:, 0].mean() if len(parts) else float("nan")
        related = parts[parts[:, 0] > 0, 1].mean() if parts[:, 0].any() else float("nan")
        score = shapeworld.evaluate(images, prompts)
        return score["position"], both, related, score["overall"]

    lines = [f"# Layout shift against the base ({len(rows)} eval prompts, same noise, {steps} steps)", "",
             "`python benchmarks/layout_shift.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "| model | mean centroid shift (px) | samples with an object moved > 3 px | position | both objects drawn "
             "| relation right when both are | overall | layout follows the relation word |",
             "|---|---|---|---|---|---|---|---|"]
    lines.append("| base | 0 | 0 | " + " | ".join(f"{v:.3f}" for v in (*scores(base), follows_relation(base))) + " |")
    measured: dict[str, list[tuple[float, ...]]] = {}  # name -> one row per LoRA (seeds)
    for spec in args.loras:
        name, _, path = spec.partition("=")
        backbone.pipe.load_lora_weights(path or name, adapter_name="probe")
        tuned = sample()
        follows = follows_relation(tuned)
        backbone.pipe.unload_lora_weights()
        shifts = [displacements(b, t) for b, t in zip(base, tuned)]
        flat = [s for per in shifts for s in per]
        moved = np.mean([any(s > 3.0 for s in per) for per in shifts])
        position, both, related, overall = scores(tuned)
        measured.setdefault(name, []).append((np.mean(flat) if flat else 0.0, moved, position, both, related, overall, follows))
        print(f"{name} ({path or name}): shift {measured[name][-1][0]:.2f} px, moved {moved:.3f}, position {position:.3f} "
              f"(both drawn {both:.3f}, relation right {related:.3f}), overall {overall:.3f}, follows the word {follows:.3f}", flush=True)
    for name, runs in measured.items():
        cols = np.asarray(runs)
        cells = [fmt(cols[:, 0], 2)] + [fmt(cols[:, c]) for c in range(1, cols.shape[1])]
        lines.append(f"| {name}{f' ({len(cols)} seeds)' if len(cols) > 1 else ''} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
