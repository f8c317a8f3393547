"""`leapalign plan`: one training step traced on fake tensors, graded against the same step run for real."""
from __future__ import annotations

import json
import resource

import pytest
import torch

from leapalign import config
from leapalign.cli import main
from leapalign.errors import UserError
from leapalign.plan import ARCHS, GiB, arch_folder, fake_pipeline, trace_step

# the shipped base, small enough for a test; attention_backend set: the planner traces every padded text token, and so
# does a run whose FLUX adapter does not merge identical padding
SMALL = ["train.batch_size=4", "train.num_steps=4", "model.attention_backend=native", "eval.every=0"]


def small_cfg(*extra: str):
    return config.load("configs/shapeworld_leapalign.yaml", SMALL + list(extra))


@pytest.mark.parametrize("extra", [(), ("train.finetune=full", "method.name=alignprop")])
def test_plan_equals_the_real_step_on_the_shipped_base(extra):
    cfg = small_cfg(*extra)
    plan = trace_step(cfg, fake=True)
    real = trace_step(cfg, fake=False)
    assert plan.peak == pytest.approx(real.peak, rel=0.10)
    assert plan.peak_phase == real.peak_phase
    assert plan.flops == real.flops > 0
    for category in ("trained weights", "frozen transformer", "frozen vae"):
        assert plan.peak_bytes.get(category, 0) == pytest.approx(real.peak_bytes.get(category, 0), rel=0.01)


def test_fsdp_memory_per_rank_falls_with_the_number_of_ranks():
    cfg = small_cfg("train.finetune=full", "train.parallel=fsdp")
    state = lambda p: sum(p.peak_bytes.get(k, 0) for k in ("trained weights", "optimizer states and masters"))  # noqa: E731
    one, four = (trace_step(cfg, n) for n in (1, 4))
    assert state(four) < 0.4 * state(one)


def test_ddp_averaging_needs_no_second_copy_of_the_gradients(monkeypatch):
    from leapalign import train

    cfg = small_cfg("train.finetune=full")
    one = trace_step(cfg, 1)
    monkeypatch.setattr(train, "GRAD_BUCKET", 2**16)
    two = trace_step(cfg, 2)
    grads = one.params["trained"] * 4
    largest = max(p.numel() for p in _transformer(cfg).parameters()) * 4
    assert two.phase_peaks["optimizer step"] <= one.phase_peaks["optimizer step"] + 2**16 * 4 + largest
    assert two.phase_peaks["optimizer step"] < one.phase_peaks["optimizer step"] + grads


def _transformer(cfg):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(arch_folder(cfg.model.path) / "transformer"))


def test_a_plan_that_does_not_fit_names_changes_that_fit(capsys):
    cfg = small_cfg()
    peak = trace_step(cfg).device_bytes() / GiB
    limit = 1.0 + (peak - 1.0) * 0.6  # above the CUDA allowance, below the plan
    code = main(["plan", "--config", "configs/shapeworld_leapalign.yaml", *sum([["--set", s] for s in SMALL], []),
                 "--gpu-memory", f"{limit:.4f}", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["per_rank"]["peak_bytes"] > limit * GiB
    assert out["fits_with"] and out["fits_with"]["changes"] and out["fits_with"]["peak_bytes"] <= limit * GiB
    assert set(out["per_rank"]["categories"]) >= {"trained weights", "gradients", "activations and temporaries"}
    assert out["flops_per_iteration"] > 0 and out["seconds_estimate"]["seconds"] > 0


@pytest.mark.parametrize("hub_id, low, high", [("black-forest-labs/FLUX.1-dev", 11.8e9, 12.0e9),
                                               ("stabilityai/stable-diffusion-3.5-large", 8.0e9, 8.2e9),
                                               ("Qwen/Qwen-Image", 20.3e9, 20.5e9),
                                               ("black-forest-labs/FLUX.2-klein-4B", 3.8e9, 4.0e9)])
def test_hub_ids_build_offline_from_the_shipped_architecture_configs(hub_id, low, high):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leapalign.plan import MemoryTrace, _fake_conversions

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with _fake_conversions(), FakeTensorMode(allow_non_fake_inputs=True), MemoryTrace():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            pipe = fake_pipeline(arch_folder(hub_id), torch.bfloat16)
        finally:
            torch.set_default_dtype(default)
    assert low < sum(p.numel() for p in pipe.transformer.parameters()) < high
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KiB: under 1 GiB for a 4-20 B model


def test_every_shipped_architecture_names_a_supported_pipeline():
    from leapalign.backbones import ADAPTERS

    folders = [p.parent for p in ARCHS.glob("*/*/model_index.json")]
    assert len(folders) >= 8
    for folder in folders:
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] in ADAPTERS


def test_a_model_the_planner_has_no_architecture_for_is_one_line():
    with pytest.raises(UserError, match="ships no architecture for it"):
        arch_folder("someone/unknown-model")


@pytest.mark.parametrize("args, words", [(["--gpu-memory", "0"], "--gpu-memory must be a positive"),
                                         (["--accelerator", "tpu9"], "unknown accelerator 'tpu9'"),
                                         (["--gpus", "0"], "--gpus must be at least 1")])
def test_bad_hardware_is_one_line(args, words, capsys):
    assert main(["plan", "--config", "configs/shapeworld_leapalign.yaml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_gpu_check_row_runs_on_the_cpu_with_random_weights():
    """benchmarks/gpu_check.py's row: plan, then the same iteration for real on random weights from the same configs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", "benchmarks/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    row = gpu_check.one_row(gpu_check.TINY["ShapeWorld LoRA"])
    assert row["device"] == "cpu" and row["plan_phase"] == row["real_phase"]
    assert row["plan_bytes"] == pytest.approx(row["measured_bytes"], rel=0.10)


def test_a_model_whose_code_fails_on_fake_tensors_is_one_line(monkeypatch, capsys):
    from leapalign.backbones.flux import FluxBackbone

    def boom(self, *args, **kwargs):
        raise RuntimeError("data-dependent size\nsecond line")

    monkeypatch.setattr(FluxBackbone, "decode", boom)
    assert main(["plan", "--config", "configs/shapeworld_leapalign.yaml", *sum([["--set", s] for s in SMALL], [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot plan shapeworld: its code failed on fake tensors (RuntimeError: data-dependent size)" in err[0]
