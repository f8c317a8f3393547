"""Every backbone adapter through the one trainer: a few LeapAlign steps with LoRA raise a toy
reward, and what the trainer saves loads back with diffusers alone and reproduces its samples.

The pipelines are tiny random configs saved to disk, so load_backbone goes through the same
from_pretrained path a user's model folder does.
"""
from __future__ import annotations

import json

import pytest
import torch

from leapalign import config
from leapalign.backbones import ADAPTERS, load_backbone
from leapalign.backbones.base import TEXT_ENCODERS
from leapalign.evaluation import load_prompt_rows, noise_for_seeds
from leapalign.errors import UserError
from leapalign.train import train

import conftest
import test_backbones_more

DATA = conftest.DATA
PROMPTS = conftest.TINY_PROMPTS
BUILDERS = {"flux": lambda: conftest._build(merged=False), "sd3": conftest.build_tiny_sd3, "flux2_klein": lambda: test_backbones_more.build_klein(deep=True),
            "qwen_image": test_backbones_more.build_qwen}


def _pipeline_kwargs(backbone, noise) -> dict:
    """The family's own pipeline call, told the adapter's guidance and given the same starting noise."""
    name = type(backbone).__name__
    if name == "QwenImageBackbone":
        return {"latents": noise, "true_cfg_scale": backbone.guidance_scale, "negative_prompt": backbone.negative_prompt}
    if name == "Flux2KleinBackbone":  # its `latents` argument is the unpacked (B, C, h, w) grid
        from leapalign.backbones.flux2 import unpack_tokens

        return {"latents": unpack_tokens(noise, *backbone.token_hw(16, 16)), "guidance_scale": backbone.guidance_scale}
    return {"latents": noise, "guidance_scale": backbone.guidance_scale}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    BUILDERS[request.param]().save_pretrained(folder)
    return folder


def _train(tmp_path, model_dir, *overrides):
    cfg = conftest.tiny_run_config(tmp_path, model_dir, "run", "train.steps=10", "train.batch_size=4", "train.lr=3e-2", "eval.num_steps=4",
                                   "eval.grid_size=4", "train.anchor=0", "train.ema=null", *overrides, reward="redness")
    return train(cfg, progress=False), tmp_path / "run", cfg

def _diffusers_reward(pipe, cfg, out_dir):
    """Mean redness of the eval images made by the diffusers pipeline's own call, from the eval seeds' noise."""
    from leapalign.rewards import load_reward

    backbone = load_backbone(cfg.model)  # only for the noise layout of this family
    rows = load_prompt_rows(cfg.eval.prompts)
    noise = noise_for_seeds(backbone, [r["seed"] for r in rows], 16, 16)
    with torch.no_grad():
        images = pipe(prompt=[r["prompt"] for r in rows], height=16, width=16, num_inference_steps=cfg.eval.num_steps,
                      output_type="pt", **_pipeline_kwargs(backbone, noise)).images
    return load_reward(cfg.reward.fn)(images, [r["prompt"] for r in rows]).mean().item()


def test_lora_training_raises_the_reward_and_loads_back_in_diffusers(tmp_path, model_dir):
    from diffusers import DiffusionPipeline

    summary, out, cfg = _train(tmp_path, model_dir)
    assert summary["after"]["reward"] > summary["before"]["reward"] + 0.01, summary
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    base = _diffusers_reward(pipe, cfg, out)
    assert base == pytest.approx(summary["before"]["reward"], abs=1e-5)
    pipe.load_lora_weights(out / "lora")
    assert _diffusers_reward(pipe, cfg, out) == pytest.approx(summary["after"]["reward"], abs=1e-4)


def test_full_finetuning_saves_a_diffusers_transformer(tmp_path, model_dir):
    from diffusers import DiffusionPipeline

    summary, out, cfg = _train(tmp_path, model_dir, "train.finetune=full", "train.lr=3e-3")
    assert summary["after"]["reward"] != pytest.approx(summary["before"]["reward"], abs=1e-4)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.transformer = type(pipe.transformer).from_pretrained(out / "transformer")
    assert _diffusers_reward(pipe, cfg, out) == pytest.approx(summary["after"]["reward"], abs=1e-4)


def test_gradient_checkpointing_changes_nothing_but_memory(model_dir):
    """Same loss gradient on every trainable weight with and without checkpointed transformer blocks."""
    from leapalign.train import setup_trainable

    grads = []
    for checkpointing in (False, True):
        cfg = config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16",
                                 f"train.gradient_checkpointing={checkpointing}"])
        bb = load_backbone(cfg.model)
        params = setup_trainable(bb, cfg.train)
        bb.transformer.train()
        torch.manual_seed(0)
        for p in params:  # LoRA B starts at zero; make the adapter non-trivial and equal in both runs
            p.data.normal_(0, 0.05)
        cond = bb.at_resolution(bb.encode_prompts(PROMPTS[:2]), 16, 16)
        x = bb.initial_noise(2, 16, 16, torch.Generator().manual_seed(1))
        bb.decode(x - 0.6 * bb.velocity(x, torch.tensor(0.6), cond), 16, 16).square().mean().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])  # Qwen: last text outputs unused
        assert bb.transformer.is_gradient_checkpointing == checkpointing
    conftest.assert_grads_close(grads[1], grads[0], rel=1e-5)


def test_incomplete_model_folder_names_what_is_missing(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match=r"incomplete: missing .*transformer/ weights.*vae/"):
        load_backbone(config.ModelConfig(path=str(broken)))


def test_unsupported_pipeline_class_is_refused(tmp_path, model_dir):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="KandinskyPipeline is not supported yet; supported pipelines: " + ", ".join(ADAPTERS)):
        load_backbone(config.ModelConfig(path=str(other)))


def test_weighted_rewards_are_logged_per_component(tmp_path, model_dir):
    """reward.fn as {name: weight}: the trained reward is the weighted sum, each component is logged by name."""
    import json

    red, bright = f"{DATA / 'user_rewards.py'}:redness", f"{DATA / 'user_rewards.py'}:brightness"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16", f"output.dir={tmp_path / 'run'}",
                             f"train.prompts={prompts}", f"eval.prompts={prompts}", "train.steps=2", "train.batch_size=2",
                             "train.num_steps=3", "eval.num_steps=3", "output.tensorboard=false"])
    cfg.reward.fn = {red: 1.0, bright: 0.5}
    train(cfg, progress=False)
    for rec in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()):
        assert rec["reward"] == pytest.approx(rec[f"reward/{red}"] + 0.5 * rec[f"reward/{bright}"], abs=1e-6)
        assert rec[f"reward/{red}"] != pytest.approx(rec[f"reward/{bright}"], abs=1e-3)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    """A hub id goes through from_pretrained; with HF_HUB_OFFLINE only the cache is searched, and a miss says so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"could not load the pipeline at nobody/no-such-model \(HF_HUB_OFFLINE is set: only the local cache is searched\)"):
        load_backbone(config.ModelConfig(path="nobody/no-such-model"))


def test_text_cache_on_cpu_changes_no_conditioning(model_dir):
    """train.text_cache=cpu: the encoders and the cache move to CPU memory; every family's conditioning
    (negative prompts and variable-length rows included) is unchanged and arrives on the model's device."""
    cfg = config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16"])
    plain = load_backbone(cfg.model)
    plain.encode_prompts(PROMPTS[:1])  # the same batches as below (a text encoder's round-off depends on the batch)
    ref = plain.encode_prompts(PROMPTS)
    backbone = load_backbone(cfg.model)
    backbone.encode_prompts(PROMPTS[:1])  # encoded before the move: the cache entry moves too
    backbone.offload_text()
    got = backbone.encode_prompts(PROMPTS)
    for part in ("batch", "shared"):
        a, b = getattr(ref, part), getattr(got, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
            assert b[k].device == backbone.device
    assert all(t.device.type == "cpu" for row in backbone._prompt_cache.values() for t in row)
    encoders = [getattr(backbone.pipe, n) for n in TEXT_ENCODERS if getattr(backbone.pipe, n, None) is not None]
    assert encoders and all(p.device.type == "cpu" for m in encoders for p in m.parameters())


def test_text_cache_on_cpu_trains_identically(tmp_path):
    folder = tmp_path / "pipe"
    BUILDERS["flux"]().save_pretrained(folder)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    a, out_a, _ = _train(tmp_path / "a", folder, "train.steps=3")
    b, out_b, _ = _train(tmp_path / "b", folder, "train.steps=3", "train.text_cache=cpu")
    drop = ("seconds", "peak_memory_mb")
    ma = [{k: v for k, v in m.items() if k not in drop} for m in map(json.loads, (out_a / "metrics.jsonl").read_text().splitlines())]
    mb = [{k: v for k, v in m.items() if k not in drop} for m in map(json.loads, (out_b / "metrics.jsonl").read_text().splitlines())]
    assert ma == mb and a["after"] == b["after"]


def test_the_anchor_base_is_the_model_without_its_lora(model_dir):
    """Every family's transformer switches its LoRA off and on again for train.anchor; the value and gradient
    equal those against a frozen copy taken before the LoRA was added."""
    import copy

    from leapalign.rollout import rollout
    from leapalign.objective import anchor_backward
    from leapalign.train import setup_trainable

    cfg = config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16", "train.lora_rank=4"])
    backbone = load_backbone(cfg.model)
    reference = copy.copy(backbone)
    reference.transformer = copy.deepcopy(backbone.transformer)
    params = setup_trainable(backbone, cfg.train)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    traj = rollout(backbone, PROMPTS, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    value = anchor_backward(backbone, traj, torch.Generator().manual_seed(2), 1.0, 1.0)
    grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]  # noqa: E731 (unused LoRA layers)
    got = grads()
    t = int(torch.randint(traj.num_steps, (1,), generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        v_base = reference.velocity(traj.states[t], traj.sigmas[t], traj.cond)
    for p in params:
        p.grad = None
    ref = (backbone.velocity(traj.states[t], traj.sigmas[t], traj.cond) - v_base).pow(2).mean()
    ref.backward()
    assert ref.item() > 1e-8 and float(value) == pytest.approx(ref.item(), rel=1e-4)
    conftest.assert_grads_close(got, grads(), rel=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux2_klein", "qwen_image"])
def test_detached_uncond_branch_gradient_equals_a_reference(family):
    """Real CFG, v = v_u + s (v_c - v_u) (Qwen-Image then rescales to |v_c|). With model.detach_uncond the
    unconditional branch runs apart without gradient: the value is the doubled batch's, and the gradient equals a
    reference built from two guidance-1 calls, v_c with gradient and v_u (the empty prompt) under no_grad.
    Defaults as the reference trainers: FLUX.2 klein detaches, SD3 (its LeapAlign config) and Qwen-Image do not."""
    pipe = BUILDERS[family]()
    adapter = ADAPTERS[type(pipe).__name__]
    s, sigma = 4.0, torch.tensor(0.6)
    x = adapter(pipe).initial_noise(2, 16, 16, torch.Generator().manual_seed(0))
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def grad_of(v):
        (v * probe).sum().backward()
        out = torch.cat([p.grad.flatten() for p in pipe.transformer.parameters() if p.grad is not None])
        pipe.transformer.zero_grad(set_to_none=True)
        return v.detach(), out

    results = {}
    for detach in (True, False):
        bb = adapter(pipe, guidance_scale=s, detach_uncond=detach)
        results[detach] = grad_of(bb.velocity(x, sigma, bb.at_resolution(bb.encode_prompts(PROMPTS[:2]), 16, 16)))
    one = adapter(pipe, guidance_scale=1.0)
    assert not one.do_cfg
    v_c = one.velocity(x, sigma, one.at_resolution(one.encode_prompts(PROMPTS[:2]), 16, 16))
    with torch.no_grad():
        v_u = one.velocity(x, sigma, one.at_resolution(one.encode_prompts(["", ""]), 16, 16))
    v_ref = v_u + s * (v_c - v_u)
    if family == "qwen_image":  # the pipeline's norm rescale
        v_ref = v_ref * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(v_ref, dim=-1, keepdim=True))
    value_ref, grad_ref = grad_of(v_ref)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[True][0], value_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[True][1], grad_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results[False][1], grad_ref, rtol=1e-3, atol=1e-5)  # the joint gradient is another one
    assert adapter(pipe).detach_uncond is {"sd3": False, "flux2_klein": True, "qwen_image": False}[family]
