"""Judges: evaluated beside the reward on held-out prompts; a reward rising while a judge falls is reported."""
import json
from pathlib import Path

import pytest

from leapalign import config
from leapalign.errors import UserError
from leapalign.judges import HackWatch, Judges, default_judges
from leapalign.train import train

USER = Path(__file__).parent / "data" / "user_rewards.py"


def _eval(step, reward, **judges):
    return step, {"reward": reward, "judges": judges}


def test_watch_warns_when_the_reward_rises_and_a_judge_falls_over_two_evaluations():
    w = HackWatch(margin=0.02)
    assert w.update(*_eval(0, 0.50, shapeeval={"overall": 0.45}, clip=0.60)) == []
    assert w.update(*_eval(100, 0.55, shapeeval={"overall": 0.44}, clip=0.61)) == []  # fell 0.01: inside the margin
    lines = w.update(*_eval(200, 0.60, shapeeval={"overall": 0.40}, clip=0.62))
    assert len(lines) == 1 and "shapeeval" in lines[0] and "0.4500 -> 0.4000" in lines[0]
    assert w.update(*_eval(300, 0.65, shapeeval={"overall": 0.30}, clip=0.63)) == []  # each judge warns once


def test_watch_is_quiet_when_the_reward_does_not_keep_rising_or_the_judges_hold():
    w = HackWatch(margin=0.02)
    for step, r, j in [(0, 0.5, 0.45), (1, 0.6, 0.40), (2, 0.55, 0.30)]:  # the reward fell at the last evaluation
        assert w.update(*_eval(step, r, shapeeval={"overall": j})) == []
    w = HackWatch(margin=0.02)
    for step, r in enumerate([0.5, 0.6, 0.7, 0.8]):
        assert w.update(*_eval(step, r, shapeeval={"overall": 0.45 + 0.01 * step})) == []


def test_before_and_after_alone_are_watched():
    w = HackWatch(margin=0.02)
    w.update(*_eval(0, 0.5, clip=0.6))
    assert w.update(*_eval(300, 0.7, clip=0.5)) == []  # a periodic evaluation needs two steps of evidence
    w = HackWatch(margin=0.02)
    w.update(*_eval(0, 0.5, clip=0.6))
    assert len(w.update(*_eval(300, 0.7, clip=0.5), final=True)) == 1


def test_default_judges_and_unknown_names():
    assert default_judges("shapeworld:eval") == ["shapeeval", "shapescore"]
    assert default_judges("prompts.txt") == []
    with pytest.raises(UserError, match="unknown judge 'shapeevl'.*did you mean 'shapeeval'"):
        Judges(["shapeevl"])
    assert list(Judges(["shapeeval", "shapescore"], exclude="shapescore").fns) == ["shapeeval"]


def _run(tmp_path, name, *overrides):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = config.load(None, [f"output.dir={tmp_path / name}", f"train.prompts={prompts}", f"eval.prompts={prompts}",
                             f"reward.fn={USER}:redness", "reward.lam=1.0", f"eval.judges=[{USER}:not_red]", "eval.hack_margin=0.0",
                             "train.batch_size=2", "train.num_steps=4", "train.lr=1e-2", "train.anchor=0", "eval.num_steps=4",
                             "eval.every=2", "train.steps=6", "eval.grid_size=2", "output.tensorboard=false", *overrides])
    return train(cfg, progress=False), tmp_path / name


def test_a_run_whose_reward_rises_while_its_judge_falls_prints_the_warning(tmp_path, capsys):
    summary, out = _run(tmp_path, "hack")
    evals = [summary["before"], *summary["during"], summary["after"]]
    rewards = [e["reward"] for e in evals]
    assert rewards[0] < rewards[1] < rewards[2]  # the constructed hack: redness goes up, so its opposite goes down
    assert len(summary["hack_warnings"]) == 1 and "judge " in summary["hack_warnings"][0]
    assert summary["hack_warnings"][0] in capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["hack_warnings"] == summary["hack_warnings"]
    assert (out / "reward_curve.png").exists()


def test_stop_on_hack_stops_and_keeps_the_best_judged_weights(tmp_path):
    summary, _ = _run(tmp_path, "stop", "eval.stop_on_hack=true")
    assert summary["stopped_at"] == 4 and summary["kept_step"] == 0  # warned at the second periodic evaluation
    # the kept weights are the base's: the final evaluation is the first one again
    assert summary["after"]["reward"] == pytest.approx(summary["before"]["reward"], abs=1e-6)
    assert summary["after"]["judges"] == pytest.approx(summary["before"]["judges"], abs=1e-6)
