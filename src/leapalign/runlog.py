"""What a run writes as it goes, and the watches on it: metrics.jsonl (a line per step), evaluations.jsonl (every
held-out evaluation: before, every eval.every steps, after), tensorboard scalars, the reward curve, and the Guard
(skipped steps, a collapsing reward, a dead hinge).  On resume each file keeps what the checkpoint's step had.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .judges import headline


def read_jsonl(path: Path, upto: int) -> list[dict]:
    """The records of a .jsonl log with step <= upto ([] when there is none)."""
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if r["step"] <= upto]


class RunLog:
    """metrics.jsonl, evaluations.jsonl and tensorboard; only the main process writes (the others log to nowhere)."""

    def __init__(self, out: Path, start: int, main: bool, tensorboard: bool):
        self.main = main
        self.metrics = read_jsonl(out / "metrics.jsonl", start) if start else []
        # a resumed run keeps the evaluations up to its checkpoint, not the final one of the run it continues
        self.evals = [e for e in read_jsonl(out / "evaluations.jsonl", start) if not e.get("final")] if start else []
        self._files = {}
        for name, records in (("metrics", self.metrics), ("evaluations", self.evals)):
            f = (out / f"{name}.jsonl").open("w") if main else open(os.devnull, "w")
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            self._files[name] = f
        self.writer = None
        if tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def _append(self, name: str, record: dict) -> None:
        self._files[name].write(json.dumps(record) + "\n")
        self._files[name].flush()

    def step(self, rec: dict) -> None:
        self.metrics.append(rec)
        self._append("metrics", rec)
        if self.writer is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def evaluation(self, step: int, res: dict, final: bool = False) -> None:
        record = {"step": step, **res, **({"final": True} if final else {})}
        self.evals.append(record)
        self._append("evaluations", record)
        if self.writer is not None:
            self.writer.add_scalar("eval/reward", res.get("reward", float("nan")), step)
            for name, value in res.get("judges", {}).items():
                for part, v in (value.items() if isinstance(value, dict) else [("", value)]):
                    self.writer.add_scalar(f"eval/{name}" + (f"_{part}" if part and part != "overall" else ""), v, step)

    def during(self) -> list[dict]:
        """The periodic evaluations: neither `before` (step 0) nor the final one."""
        return [e for e in self.evals if e["step"] > 0 and not e.get("final")]

    def close(self, curve: Path | None = None) -> None:
        for f in self._files.values():
            f.close()
        if curve is not None and self.main:
            plot_curve([m for m in self.metrics if "skipped" not in m], curve, self.evals)
        if self.writer is not None:
            self.writer.close()


def plot_curve(metrics: list[dict], path: Path, evals: list[dict]) -> None:
    """The training reward per step and its held-out value, and beside it every judge at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge_names = list(evals[0].get("judges", {})) if evals else []
    fig, axes = plt.subplots(1, 2 if judge_names else 1, figsize=(11 if judge_names else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    steps = [m["step"] for m in metrics]
    r = np.array([m["reward"] for m in metrics])
    ax.plot(steps, r, alpha=0.35, label="train reward (batch mean)")
    if len(r) >= 5:
        k = max(2, len(r) // 10)
        ax.plot(steps[k - 1 :], np.convolve(r, np.ones(k) / k, mode="valid"), label=f"moving average ({k})")
    if evals:
        ax.plot([e["step"] for e in evals], [e.get("reward", float("nan")) for e in evals], "o-", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    if judge_names:
        jx = axes[0, 1]
        for name in judge_names:
            pts = [(e["step"], headline(e["judges"][name])) for e in evals if name in e.get("judges", {})]
            jx.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        jx.set_xlabel("step")
        jx.set_ylabel("judge (held-out, never trained on)")
        jx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Guard:
    """Counts skipped (non-finite) steps, stops a run that keeps failing, and warns once when the reward collapses
    or when the hinge passes no gradient at the first step (a margin on another scale than the reward's)."""

    def __init__(self, max_in_a_row: int, say, lam: float, skipped: int = 0):
        self.max_in_a_row, self.lam = max_in_a_row, lam  # skipped: the count so far, on resume
        self.skipped, self.in_a_row, self.rewards, self.warned, self.warnings = skipped, 0, [], False, []
        self._say = say

    def say(self, line: str) -> None:
        if line.startswith("warning"):
            self.warnings.append(line)
        self._say(line)

    def watch_hinge(self, rec: dict, first: bool) -> None:
        """relu(lam - r) is zero for every sample of the run's first step: say so, with the rewards' range."""
        if first and rec.get("active") == 0 and "skipped" not in rec:
            self.say(f"warning: every sample's reward is above reward.lam = {self.lam:g} (rewards {rec['reward_min']:.4g} to "
                     f"{rec['reward_max']:.4g}): the hinge passes no gradient and nothing trains; set reward.lam above "
                     "the rewards it should raise (docs/rewards.md gives each reward's range)")

    def record(self, step: int, bad: str | None, rec: dict) -> int:
        if bad is None:
            self.in_a_row = 0
            return self.skipped
        self.skipped += 1
        self.in_a_row += 1
        self.say(f"step {step} skipped: non-finite {bad} (k, j = {rec.get('k')}, {rec.get('j')}; prompts {rec.get('prompts')})")
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(f"stopped at step {step}: {self.in_a_row} steps in a row had a non-finite {bad}; "
                            "lower train.lr, check the reward, or resume from the last checkpoint")
        return self.skipped

    def watch_reward(self, rec: dict) -> None:
        """Divergence: the last 10 steps' mean reward far below the first 10 steps' (3 standard deviations)."""
        if "skipped" in rec:
            return
        self.rewards.append(rec["reward"])
        if self.warned or len(self.rewards) < 20:
            return
        first, last = np.array(self.rewards[:10]), np.array(self.rewards[-10:])
        if last.mean() < first.mean() - max(3 * first.std(), 1e-3):
            self.warned = True
            self.say(f"warning: the reward is collapsing ({first.mean():.4f} over the first 10 steps, {last.mean():.4f} over the "
                     f"last 10); the run may be diverging: consider a lower train.lr")
