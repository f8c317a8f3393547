"""Bad input gets one clear line on stderr, exit code 2, and no output directory."""
import subprocess
import sys
from pathlib import Path

import pytest

from leapalign import config
from leapalign.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "shapeworld_leapalign.yaml"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "leapalign", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("leapalign: error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_defaults_are_the_papers_and_shapeworlds_tuning_is_its_preset():
    """config.py's objective and optimiser defaults are the paper's (generic where it has none); ShapeWorld's tuned
    settings live in its preset, which `leapalign demo` loads (configs/shapeworld_leapalign.yaml is that file)."""
    from leapalign.shapeworld import DEMO_CONFIG

    cfg = config.load(None)
    m, tc = cfg.method, cfg.train
    assert (m["name"], m["alpha"], m["tau"], m["pairs_per_rollout"], m["weighting"]) == ("leapalign", 0.3, 0.1, 1, True)
    assert (tc.num_steps, tc.ema, tc.anchor, tc.weight_decay, tc.grad_clip, tc.betas) == (25, 0.995, 0.0, 1e-4, 1.0, [0.9, 0.999])
    assert tc.lr == 1e-4 and config.load(None, ["train.finetune=full"]).train.lr == 1e-5  # LoRA / the paper's full FT
    assert PRESET.resolve() == DEMO_CONFIG.resolve()
    demo = config.load(PRESET)
    assert (demo.train.lr, demo.method["pairs_per_rollout"], demo.train.num_steps, demo.train.ema) == (1e-3, 2, 16, 0.99)


def test_a_real_model_run_names_the_shapeworld_values_it_kept_and_the_anchor():
    notes = config.world_notes(config.load(None, ["model.path=/models/FLUX.1-dev", "train.prompts=p.txt", "train.anchor=30",
                                                  "reward.fn=hpsv2.1"]))
    assert len(notes) == 2
    assert "model.height=32" in notes[0] and "eval.prompts=shapeworld:eval" in notes[0] and "train.prompts" not in notes[0]
    assert "train.anchor = 30" in notes[1] and "paper" in notes[1]
    assert config.world_notes(config.load(None, ["train.anchor=30"])) == []  # ShapeWorld itself: nothing to say


PAPER_PRESETS = {  # file: (reward, alpha, lam, resolution, iterations), the numbers the LeapAlign paper gives
    "flux1_dev_hpsv21.yaml": ("hpsv2.1", 0.3, 0.55, 720, 300),
    "flux1_dev_pickscore.yaml": ("pickscore", 0.1, 0.4, 720, 300),
    "sd35m_hpsv21.yaml": ("hpsv2.1", 0.3, 0.55, 512, 200),
}


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_load_and_hold_the_paper_numbers(name):
    from leapalign.rewards import BUILTIN

    cfg = config.load(ROOT / "configs" / name, ["model.path=/models/x"])
    reward, alpha, lam, size, steps = PAPER_PRESETS[name]
    cos_scale = 100.0 if reward == "pickscore" else 1.0  # the paper's margins are on the plain cosine; our PickScore is 100 cos
    assert (cfg.reward.fn, cfg.method["alpha"], cfg.reward.lam / cos_scale) == (reward, alpha, lam)
    assert (cfg.model.height, cfg.model.width, cfg.train.steps) == (size, size, steps)
    assert (cfg.train.finetune, cfg.train.lr, cfg.train.batch_size, cfg.train.ema, cfg.train.num_steps) == ("full", 1e-5, 64, 0.995, 25)
    assert cfg.model.path == "/models/x" and cfg.reward.fn in BUILTIN


def test_set_overrides_are_typed():
    cfg = config.load(PRESET, ["train.steps=7", "method.alpha=0.1", "train.ema=0.99", "train.lora_targets=to_q,to_k"])
    assert cfg.train.steps == 7 and cfg.method["alpha"] == 0.1 and cfg.train.ema == 0.99
    assert cfg.train.lora_targets == ["to_q", "to_k"]
    combo = config.load(PRESET, ["reward.fn={shapescore: 1.0, pickscore: 0.5}", "model.guidance_scale=4"])
    assert combo.reward.fn == {"shapescore": 1.0, "pickscore": 0.5} and combo.model.guidance_scale == 4.0
    with pytest.raises(UserError, match=r"reward.fn.pickscore must be a number"):
        config.load(PRESET, ["reward.fn={shapescore: 1.0, pickscore: high}"])


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "did you mean 'steps'"),
    ("trian.steps=3", "did you mean 'train'"),
    ("method.alpah=0.3", "did you mean 'method.alpha'"),
    ("method.name=leapalgin", "did you mean 'leapalign'"),
    ("method.alpha=1.5", "method.alpha must be in [0, 1]"),
    ("method.window=0.8,0.2", "method.window"),
    ("train.steps=abc", "train.steps must be a number"),
    ("train.steps=2.5", "whole number"),
])
def test_bad_config_values_name_the_problem(override, fragment):
    with pytest.raises(UserError, match=None) as e:
        config.load(PRESET, [override])
    assert fragment in str(e.value)


def test_unknown_config_key_exits_2_without_output(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(PRESET), "--set", "train.stepz=3", "--set", f"output.dir={out}")
    assert_one_line_error(proc, "train.stepz", "did you mean 'steps'")
    assert not out.exists()


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "nope.yaml")), "does not exist")


@pytest.mark.parametrize("fn, fragment", [
    ("no_such_module_xyz:reward", "cannot be imported"),
    ("tests/data/missing.py:reward", "does not exist"),
    ("tests/data/user_rewards.py:redniss", "did you mean 'redness'"),
    ("sharpness", "unknown reward 'sharpness'"),
    ("tests/data/user_rewards.py:wrong_shape", "must return a tensor of shape (2,)"),
    ("tests/data/user_rewards.py:not_finite", "non-finite"),
])
def test_bad_reward_spec_exits_2_without_output(tmp_path, fn, fragment):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(PRESET), "--set", f"reward.fn={fn}", "--set", f"output.dir={out}")
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_resolution_the_model_cannot_take(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(PRESET), "--set", "model.height=30", "--set", f"output.dir={out}")
    assert_one_line_error(proc, "not a multiple of 8")
    assert not out.exists()


def test_missing_model_folder(tmp_path):
    proc = run_cli("eval", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "e.json"))
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "e.json").exists()


def test_unknown_prompt_set(tmp_path):
    proc = run_cli("eval", "--prompts", "shapeworld:tests", "--output", str(tmp_path / "e.json"))
    assert_one_line_error(proc, "unknown ShapeWorld prompt set 'tests'")


def test_existing_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("train", "--config", str(PRESET), "--set", f"output.dir={out}")
    assert_one_line_error(proc, "already exists")
    assert (out / "keep.txt").read_text() == "precious"


def test_demo_trains_a_few_steps_and_prints_the_reward_and_both_judges(tmp_path):
    """`leapalign demo` as a user runs it, shortened: the table shows the training reward and both ShapeWorld judges."""
    out = tmp_path / "demo"
    proc = run_cli("demo", "--steps", "2", "--output-dir", str(out), "--set", "train.batch_size=2", "--set", "train.num_steps=4",
                   "--set", "eval.num_images=6", "--set", "eval.num_steps=4", "--set", "eval.grid_size=6")
    assert proc.returncode == 0, proc.stderr
    for line in ("reward shapematch", "judge shapeeval", "  position", "judge shapescore"):
        assert line in proc.stdout, proc.stdout
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["reward"] == "shapematch" and set(summary["after"]["judges"]) == {"shapeeval", "shapescore"}


def test_shapematch_on_prompts_outside_shapeworld_is_one_line_and_no_output(tmp_path):
    prompts = tmp_path / "cats.txt"
    prompts.write_text("a photo of a cat\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(PRESET), "--set", f"train.prompts={prompts}", "--set", f"output.dir={out}")
    assert_one_line_error(proc, "shapematch reward reads ShapeWorld prompts only", "reward.fn")
    assert not out.exists()


# Realistic values of each paper preset's reward on our scale, for FLUX.1-dev / SD3.5-M before and after training:
# HPSv2.1 is a raw cosine, 0.29 to 0.31 for the base models and 0.38 to 0.44 after reward training (LeapAlign paper:
# FLUX.1-dev 0.3078 -> 0.4092); PickScore is 100 cos, 22.5 to 22.8 for the bases and up to about 23.8 after training
# (LeapAlign paper: FLUX.1-dev 22.79 -> 23.71; PickScore README's formula logit_scale.exp() * cos).
REALISTIC = {"hpsv2.1": (0.25, 0.45), "pickscore": (19.0, 24.5)}


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_hinge_is_active_at_realistic_rewards(name):
    """relu(lam - r) * scale > 0 over the reward's whole realistic range, with the paper's slope on its scale
    (PickScore's 0.4 margin is on the cosine: 40 - 100 cos, times 0.01, is exactly 0.4 - cos)."""
    cfg = config.load(ROOT / "configs" / name, ["model.path=/models/x"])
    lo, hi = REALISTIC[cfg.reward.fn]
    assert cfg.reward.lam > hi, (cfg.reward.lam, hi)
    cos_scale = 100.0 if cfg.reward.fn == "pickscore" else 1.0  # the paper's margin is on the plain cosine
    assert cfg.reward.lam / cos_scale == pytest.approx(PAPER_PRESETS[name][2]) and cfg.reward.scale * cos_scale == pytest.approx(1.0)


def test_builtin_rewards_bring_their_own_hinge_and_a_users_reward_must_set_it():
    from leapalign.rewards import BUILTIN, HINGE

    assert set(HINGE) == set(BUILTIN)  # every built-in has a stated margin
    for name in ("hpsv2.1", "pickscore", "shapematch"):
        cfg = config.load(None, [f"reward.fn={name}"])
        assert (cfg.reward.lam, cfg.reward.scale) == HINGE[name]
    assert config.load(None, ["reward.fn=pickscore", "reward.lam=30"]).reward.scale == 0.01
    for spec in ("tests/data/user_rewards.py:brightness", "{hpsv2.1: 1.0, pickscore: 0.5}"):
        with pytest.raises(UserError, match="reward.lam is not set"):
            config.load(None, [f"reward.fn={spec}"])
    assert config.load(None, ["reward.fn=tests/data/user_rewards.py:brightness", "reward.lam=0.7"]).reward.scale == 1.0


def test_a_margin_below_every_reward_is_reported_in_one_line(tmp_path):
    """The PickScore preset's old lam 0.4 against PickScore-scale values: nothing trains, and the run says so."""
    import json

    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(PRESET), "--set", "reward.fn=tests/data/user_rewards.py:pickscore_like",
                   "--set", "reward.lam=0.4", "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "eval.every=0",
                   "--set", "eval.num_steps=2", "--set", "eval.judges=[]", "--set", f"eval.prompts={ROOT / 'tests/data/two_prompts.txt'}",
                   "--set", "output.tensorboard=false", "--set", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "hinge passes no gradient" in l]
    assert len(lines) == 1 and "reward.lam = 0.4" in lines[0], proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == [lines[0].strip()]
    (metrics,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["active"] == 0 and metrics["grad_norm"] == 0


@pytest.mark.parametrize("override, fragment", [
    ("train.finetune=qlora", "train.finetune must be one of lora, full, got 'qlora'"),
    ("model.dtype=fp8", "model.dtype must be one of float32, bfloat16, float16"),
    ("train.parallel=zero3", "train.parallel must be one of ddp, fsdp"),
    ("train.num_steps=1", "train.num_steps must be >= 2 so that a method has two steps"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("eval.every=-1", "eval.every must be >= 0"),
    ("train.ema=1.5", "train.ema must be in (0, 1) or null"),
    ("train.lr=0", "train.lr must be positive"),
])
def test_config_is_checked_in_one_place_when_read(override, fragment):
    with pytest.raises(UserError) as e:
        config.load(PRESET, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_removed_key_is_explained_and_ignored():
    with pytest.warns(UserWarning, match="output.log_every is ignored"):
        cfg = config.load(PRESET, ["output.log_every=5"])
    assert "log_every" not in config.dump(cfg)


def test_a_launch_that_asked_for_processes_and_got_one_says_so(monkeypatch):
    from leapalign.train import launch_notes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    (note,) = launch_notes(1)
    assert "started one" in note and "--num-processes" in note
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_notes(2) == []
