"""Data parallelism through accelerate: 2 processes (gloo, CPU) with batch b give the same update as 1 process with 2b."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import conftest
from leapalign import config
from leapalign.train import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares above a green circle", "a small yellow square", "a cyan triangle", "a green square"]


def _cfg(tmp_path, model_dir, name, batch, *extra):
    return conftest.tiny_run_config(tmp_path, model_dir, name, "train.steps=3", f"train.batch_size={batch}", "eval.num_images=2",
                                    "method.pairs_per_rollout=2", *extra, prompts=PROMPTS)


@pytest.mark.parametrize("parallel,finetune,reshard", [("ddp", "lora", True), ("fsdp", "lora", True), ("fsdp", "full", True),
                                                       ("fsdp", "full", False)])
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path, parallel, finetune, reshard):
    """DDP (gradients all-reduced) and FSDP2 (blocks sharded, gradients reduce-scattered; reshard=False is
    ZeRO-2) alike; what either saves (checkpoint, LoRA, transformer folder) is whole, so it loads like a
    1-process run's."""
    model_dir = tmp_path / "pipe"
    conftest._build(merged=False).save_pretrained(model_dir)
    # the default velocity anchor stays on (its step choice must match too), except where it would need a frozen
    # whole copy on every rank, which fsdp refuses
    anchor = ("train.anchor=0",) if (parallel, finetune) == ("fsdp", "full") else ()
    extra = (f"train.finetune={finetune}", f"train.lr={1e-2 if finetune == 'lora' else 1e-3}", "train.ema=0.9", *anchor)
    train(_cfg(tmp_path, model_dir, "one", 4, *extra), progress=False)
    two = _cfg(tmp_path, model_dir, "two", 2, f"train.parallel={parallel}", f"train.fsdp_reshard={reshard}", *extra)
    (tmp_path / "two.yaml").write_text(config.dump(two))
    proc = subprocess.run([sys.executable, "-m", "leapalign", "train", "--config", str(tmp_path / "two.yaml"), "--num-processes", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["parallel"] == parallel
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["k"], m["j"]) for m in a] == [(m["k"], m["j"]) for m in b]
    for ma, mb in zip(a, b):
        for key in ("reward", "loss", "grad_norm"):
            assert mb[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-7), (ma["step"], key)
    # summation order differs (two half-batch means, then their mean); AdamW turns that round-off into
    # at most ~1e-5 of weight after three steps of size ~lr = 1e-2
    files = ["checkpoints/step_3/trainable.safetensors", "checkpoints/step_3/ema.safetensors"]
    files.append("lora/pytorch_lora_weights.safetensors" if finetune == "lora" else "transformer/diffusion_pytorch_model.safetensors")
    assert all(m["grad_norm"] > 0 for m in a)
    for f in files:
        wa, wb = load_file(tmp_path / "one" / f), load_file(tmp_path / "two" / f)
        assert wa.keys() == wb.keys(), f
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)


def test_bad_input_with_several_processes_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no-model'}\noutput:\n  dir: {tmp_path / 'out'}\n")
    proc = subprocess.run([sys.executable, "-m", "leapalign", "train", "--config", str(cfg), "--num-processes", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"leapalign: error: model folder {tmp_path / 'no-model'} does not exist; "
                                                "set model.path to a diffusers folder or hub id"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env,words", [({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "DeepSpeed ZeRO-2"),
                                       ({"ACCELERATE_USE_FSDP": "true"}, "selects FSDP")])
def test_an_accelerate_engine_config_is_refused_with_the_equivalent_setting(tmp_path, monkeypatch, env, words):
    """accelerate's DeepSpeed/FSDP engines act only through prepare(), which the trainer does not call: silently
    training unsharded would be worse than saying so."""
    from leapalign.errors import UserError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = config.load(None, [f"output.dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match=words) as e:
        train(cfg, progress=False)
    assert "train.parallel=fsdp" in str(e.value)
    assert not (tmp_path / "out").exists()
