"""The paper presets train: `leapalign train --config configs/<preset>` on a tiny random model of the preset's family,
with a tiny reward of the preset's kind at the real checkpoint's scale (PickScore's logit scale 100), takes steps
whose hinge is active and whose gradient is not zero. A margin on the wrong scale (PickScore's 0.4 against a
score of about 20) trained nothing, silently; these runs would catch it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import conftest
import test_rewards
from test_cli_errors import ROOT, run_cli

PRESETS = {"flux1_dev_hpsv21.yaml": ("flux", "hpsv2.1"), "flux1_dev_pickscore.yaml": ("flux", "pickscore"),
           "sd35m_hpsv21.yaml": ("sd3", "hpsv2.1")}
BUILD = {"flux": lambda: conftest._build(merged=False), "sd3": conftest.build_tiny_sd3}


def _reward_dir(root: Path, name: str) -> Path:
    """$LEAPALIGN_REWARD_DIR/<name> with a tiny random checkpoint laid out as the real one."""
    if name == "hpsv2.1":
        test_rewards._bpe_files(root / name)
        torch.save({"state_dict": test_rewards._ref(**test_rewards.HPS_DIMS).state_dict()}, root / name / "HPS_v2.1_compressed.pt")
    else:  # PickScore_v1's logit scale: exp(4.6052) = 100
        model = test_rewards._tiny_clip(root / name, 1)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100.0))
        model.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_preset_trains_on_a_tiny_model_of_its_family(tmp_path, monkeypatch, preset):
    family, reward = PRESETS[preset]
    model_dir = tmp_path / "model"
    BUILD[family]().save_pretrained(model_dir)
    monkeypatch.setenv("LEAPALIGN_REWARD_DIR", str(_reward_dir(tmp_path / "rewards", reward)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat on a sofa\n")
    out = tmp_path / "run"
    sets = [f"model.path={model_dir}", "model.height=16", "model.width=16", f"train.prompts={prompts}", f"eval.prompts={prompts}",
            "train.steps=2", "train.batch_size=2", "train.num_steps=4", "train.save_every=0", "eval.num_steps=2", "eval.batch_size=2",
            "eval.every=0", "eval.judges=[]", "eval.grid_size=2", "output.tensorboard=false", f"output.dir={out}"]
    proc = run_cli("train", "--config", str(ROOT / "configs" / preset), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hinge passes no gradient" not in proc.stdout + proc.stderr
    config = (out / "config.yaml").read_text()
    assert f"fn: {reward}" in config and "finetune: full" in config
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for rec in steps:
        assert rec["active"] > 0 and rec["grad_norm"] > 0 and math.isfinite(rec["grad_norm"]), rec
    if reward == "pickscore":  # the paper's 0.4 on the cosine, on the 100 cos score
        assert "lam: 40.0" in config and "scale: 0.01" in config
