"""train.anchor: beta * ||v_theta - v_base||^2 at a rollout state, with the base = the transformer with its LoRA off."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import conftest
from leapalign import config
from leapalign.backbones.flux import FluxBackbone
from leapalign.errors import UserError
from leapalign.rollout import rollout
from leapalign.objective import anchor_backward
from leapalign.train import setup_trainable, train

PROMPTS = conftest.TINY_PROMPTS


def test_anchor_gradient_equals_a_frozen_copy_of_the_base():
    """The reference keeps an untouched copy of the transformer, as a KL penalty to a frozen model would."""
    from diffusers import FluxPipeline

    pipe = conftest._build(merged=False)
    frozen = copy.deepcopy(pipe.transformer)
    bb = FluxBackbone(pipe)
    params = setup_trainable(bb, config.load(None, ["train.lora_rank=4"]).train)
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts B at zero (LoRA = base); move it so the anchor has something to pull
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    traj = rollout(bb, PROMPTS, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    value = anchor_backward(bb, traj, torch.Generator().manual_seed(7), 3.0, 0.5)
    got = [p.grad.clone() for p in params]

    t = int(torch.randint(traj.num_steps, (1,), generator=torch.Generator().manual_seed(7)))
    ref_bb = FluxBackbone(FluxPipeline(**{**pipe.components, "transformer": frozen}))
    with torch.no_grad():
        v_base = ref_bb.velocity(traj.states[t], traj.sigmas[t], traj.cond)
    for p in params:
        p.grad = None
    ref = 3.0 * (bb.velocity(traj.states[t], traj.sigmas[t], traj.cond) - v_base).pow(2).mean()
    (0.5 * ref).backward()
    assert float(value) == pytest.approx(ref.item(), rel=1e-5)
    assert ref.item() > 1e-6
    conftest.assert_grads_close(got, [p.grad for p in params])
    assert pipe.transformer.active_adapters(), "the LoRA must be switched back on"


def _cfg(tmp_path, model_dir, name, *extra):
    return conftest.tiny_run_config(tmp_path, model_dir, name, "train.steps=8", "train.batch_size=4", "train.lr=3e-2", "eval.num_steps=4",
                                    "eval.num_images=4", "eval.grid_size=4", "train.save_every=0", *extra)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_anchor_keeps_the_trained_field_near_the_base(tmp_path, finetune):
    """Same seed, same batches: a strong anchor ends with a smaller velocity drift from the base than none
    (LoRA: the base is the LoRA switched off; full fine-tuning: a frozen copy)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    model_dir = tmp_path / "pipe"
    conftest._build(merged=False).save_pretrained(model_dir)
    lr = "train.lr=3e-2" if finetune == "lora" else "train.lr=3e-3"
    drift = {}
    for beta in (0.0, 100.0):
        name = f"beta{beta:g}"
        train(_cfg(tmp_path, model_dir, name, f"train.anchor={beta}", f"train.finetune={finetune}", lr), progress=False)
        pipe = FluxPipeline.from_pretrained(model_dir)
        bb = FluxBackbone(pipe)
        traj = rollout(bb, PROMPTS, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        base = torch.stack([bb.velocity(traj.states[i], traj.sigmas[i], traj.cond) for i in range(4)])
        if finetune == "lora":
            pipe.load_lora_weights(tmp_path / name / "lora")
        else:
            bb.transformer = FluxTransformer2DModel.from_pretrained(tmp_path / name / "transformer")
        with torch.no_grad():
            tuned = torch.stack([bb.velocity(traj.states[i], traj.sigmas[i], traj.cond) for i in range(4)])
        drift[beta] = (tuned - base).pow(2).mean().item()
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert ("anchor" in rows[-1]) == (beta > 0)
    assert drift[0.0] > 1e-6
    assert drift[100.0] < 0.5 * drift[0.0], drift


@pytest.mark.parametrize("extra,words", [(("train.anchor=-1",), "train.anchor must be >= 0"),
                                         (("train.anchor=1", "train.finetune=full", "train.parallel=fsdp"), "frozen copy")])
def test_bad_anchor_settings_are_one_clear_error(tmp_path, extra, words):
    with pytest.raises(UserError, match=words):  # refused when the config is read, before anything loads
        config.load(None, [f"output.dir={tmp_path / 'out'}", *extra])
    assert not (tmp_path / "out").exists()
