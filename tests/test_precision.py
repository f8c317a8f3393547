"""Memory and precision switches every method shares: each changes memory or speed, not the result.

- train.decode_batch: the reward gradient decoded in chunks equals the whole-batch one;
- train.fp32_master: bf16 weights with fp32 master copies keep updates that bf16 alone rounds away,
  and a bf16 step's gradient matches the fp32 one to bf16 precision;
- train.vae_checkpointing: the same reward gradient;
- train.gradient_checkpointing: tests/test_backbones.py (identical gradients for every family).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import conftest
from leapalign import config
from leapalign.backbones.flux import FluxBackbone
from leapalign.rewards import load_reward
from leapalign.objective import reward_gradient
from leapalign.train import MasterWeights, setup_trainable, train

DATA = Path(__file__).parent / "data"
PROMPTS = ["a red circle", "two blue squares above a green circle", "a small yellow square", "a cyan triangle"]


def test_chunked_decode_gives_the_same_reward_gradient(tiny_flux_pipe):
    bb = FluxBackbone(tiny_flux_pipe)
    reward = load_reward({f"{DATA / 'user_rewards.py'}:redness": 1.0, f"{DATA / 'user_rewards.py'}:brightness": 0.5})
    x = bb.initial_noise(4, 16, 16, torch.Generator().manual_seed(0))
    *whole, comps_whole = reward_gradient(bb, reward, x, PROMPTS, 16, 16, lam=1.0, scale=2.0)
    *chunked, comps_chunked = reward_gradient(bb, reward, x, PROMPTS, 16, 16, lam=1.0, scale=2.0, chunk=3)  # chunks of 3 and 1
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert whole[2].abs().max() > 0
    assert {k: v.shape for k, v in comps_chunked.items()} == {k: (4,) for k in comps_whole} and len(comps_whole) == 2
    for k in comps_whole:
        torch.testing.assert_close(comps_chunked[k], comps_whole[k])


def test_vae_checkpointing_gives_the_same_reward_gradient():
    """train.vae_checkpointing recomputes the decoder's blocks in backward: the same dLoss/dx_N, and the switch is on."""
    from leapalign.config import TrainConfig

    bb = FluxBackbone(conftest._build(merged=False))
    reward = load_reward(f"{DATA / 'user_rewards.py'}:redness")
    x = bb.initial_noise(4, 16, 16, torch.Generator().manual_seed(0))
    plain = reward_gradient(bb, reward, x, PROMPTS, 16, 16, lam=1.0, scale=2.0)[2]
    setup_trainable(bb, TrainConfig(vae_checkpointing=True))
    assert bb.vae.decoder.gradient_checkpointing
    recomputed = reward_gradient(bb, reward, x, PROMPTS, 16, 16, lam=1.0, scale=2.0)[2]
    torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)
    assert plain.abs().max() > 0


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """AdamW steps of 1e-4 on a weight of 1.0: bf16 (ulp 2^-7 there) never moves; the fp32 master moves 100 x 1e-4."""
    finals = {}
    for enabled in (False, True):
        w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
        master = MasterWeights([w], enabled)
        opt = torch.optim.AdamW(master.params, lr=1e-4, weight_decay=0.0)
        for _ in range(100):
            w.grad = torch.ones_like(w)
            master.grads_to_master()
            opt.step()
            master.to_model()
            opt.zero_grad(set_to_none=True)
        finals[enabled] = (w.detach().float().clone(), master.params[0].detach().clone())
    assert torch.equal(finals[False][0], torch.ones(8))  # every update lost
    assert finals[True][1].dtype == torch.float32
    torch.testing.assert_close(finals[True][1], torch.full((8,), 0.99), rtol=0, atol=1e-4)
    assert finals[True][0].max() < 1.0  # and the model follows its master


def test_bf16_step_gradient_matches_fp32_and_training_keeps_fp32_masters(tmp_path):
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = conftest._build(merged=False)
        for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.to(dtype)
        bb = FluxBackbone(pipe)
        params = setup_trainable(bb, config.TrainConfig())
        torch.manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape) * 0.05)
        cond = bb.at_resolution(bb.encode_prompts(PROMPTS[:2]), 16, 16)
        x = bb.initial_noise(2, 16, 16, torch.Generator().manual_seed(1)).to(dtype)
        bb.decode(x - 0.6 * bb.velocity(x, torch.tensor(0.6), cond), 16, 16).float().square().mean().backward()
        grads[dtype] = [p.grad.float() for p in params]
    a, b = torch.cat([g.flatten() for g in grads[torch.bfloat16]]), torch.cat([g.flatten() for g in grads[torch.float32]])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    # measured: cos 0.981, relative L2 error 0.24 (bf16 keeps 8 bits of every activation of this
    # random model); a dtype bug (a dropped cast, a gradient through the wrong copy) gives cos ~0
    assert cos > 0.95, cos

    model_dir = tmp_path / "pipe"
    conftest._build(merged=False).save_pretrained(model_dir)
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(PROMPTS) + "\n")
    cfg = config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16", "model.dtype=bfloat16",
                             f"reward.fn={DATA / 'user_rewards.py'}:brightness", "reward.lam=1.0", f"output.dir={tmp_path / 'run'}",
                             f"train.prompts={pfile}", f"eval.prompts={pfile}", "train.steps=2", "train.batch_size=2",
                             "train.num_steps=3", "eval.num_steps=2", "output.tensorboard=false", "train.ema=0.9"])
    summary = train(cfg, progress=False)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoints" / "step_2" / "trainable.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert summary["after"]["reward"] == pytest.approx(summary["after"]["reward"])  # finite


def test_bf16_leapalign_leaps_are_fp32_and_distances_float64(tiny_flux_pipe_bf16):
    """With a bf16 model the two leaps and connectors are float32 and d_j, d_N float64 (as the reference code keeps
    them): the weight equals an independent float64 reference to float32 rounding, and the gradient equals the
    reference's built from the same bf16 velocities.  Leaps rounded to bf16 move the weight by up to ~1%."""
    from leapalign.methods.leapalign import leap_surrogate
    from leapalign.rollout import rollout

    bb = FluxBackbone(tiny_flux_pipe_bf16)
    traj = rollout(bb, PROMPTS[:3], 6, 16, 16, generator=torch.Generator().manual_seed(0))
    assert traj.sample.dtype == torch.bfloat16
    x, s, cond = traj.states, traj.sigmas, traj.cond
    k, j, alpha, tau = 1, 4, 0.3, 1e-3
    g = torch.randn(traj.sample.shape, generator=torch.Generator().manual_seed(1))

    def grads():
        out = torch.cat([p.grad.float().flatten() for p in bb.transformer.parameters() if p.grad is not None])
        bb.transformer.zero_grad(set_to_none=True)
        return out

    # reference: every leap and connector in float32, distances in float64, written out directly
    v1 = bb.velocity(x[k], s[k], cond).float()
    xhat_j = x[k].float() + (s[j] - s[k]) * v1
    xt_j = xhat_j + (x[j].float() - xhat_j).detach()
    v2 = bb.velocity((alpha * xt_j + (1 - alpha) * xt_j.detach()).to(torch.bfloat16), s[j], cond).float()
    xhat_n = xt_j - s[j] * v2
    xt_n = xhat_n + (x[-1].float() - xhat_n).detach()
    d_j = (xhat_j.double() - x[j].double()).abs().flatten(1).mean(1)
    d_n = (xhat_n.double() - x[-1].double()).abs().flatten(1).mean(1)
    w_ref = 1 / (d_j.clamp(min=tau) + d_n.clamp(min=tau))
    torch.autograd.backward(xt_n, grad_tensors=g * w_ref.float()[:, None, None])
    g_ref = grads()

    sur = leap_surrogate(bb, traj, k, j, alpha, tau, True)
    assert sur.endpoint.dtype == torch.float32 and sur.weight.dtype == torch.float32
    torch.testing.assert_close(sur.weight.double(), w_ref, rtol=1e-6, atol=0)
    torch.autograd.backward(sur.endpoint, grad_tensors=g * sur.weight[:, None, None])
    torch.testing.assert_close(grads(), g_ref, rtol=1e-5, atol=1e-7)

    # the test can fail: the same weight from leaps rounded to bf16 (the old behaviour) is measurably off
    xhat_j16 = (x[k].float() + (s[j] - s[k]) * v1).to(torch.bfloat16)
    xhat_n16 = (x[j].float() - s[j] * v2).to(torch.bfloat16)
    w16 = 1 / ((xhat_j16 - x[j]).abs().flatten(1).mean(1).clamp(min=tau) + (xhat_n16 - x[-1]).abs().flatten(1).mean(1).clamp(min=tau))
    assert ((w16.double() - w_ref).abs() / w_ref).max() > 1e-4


def test_compiled_training_equals_the_eager_run_within_tolerance(tmp_path):
    """train.compile (torch.compile of the transformer, rollout and training calls): the same run as eager to float
    tolerance, and the saved LoRA keeps the parameter names a diffusers pipeline loads."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "pipe"
    conftest._build(merged=False).save_pretrained(model_dir)
    runs = {}
    for compiled in (False, True):
        name = f"compile_{compiled}"
        cfg = conftest.tiny_run_config(tmp_path, model_dir, name, "train.steps=2", "eval.num_images=2", f"train.compile={compiled}",
                                       "train.lr=1e-2")
        summary = train(cfg, progress=False)
        runs[compiled] = (summary, load_file(tmp_path / name / "lora" / "pytorch_lora_weights.safetensors"))
    (eager, w_eager), (compiled, w_compiled) = runs[False], runs[True]
    assert compiled["after"]["reward"] == pytest.approx(eager["after"]["reward"], abs=1e-4)
    assert w_compiled.keys() == w_eager.keys()
    for k in w_eager:
        torch.testing.assert_close(w_compiled[k], w_eager[k], rtol=1e-3, atol=1e-5)
    assert any((w_eager[k] != 0).any() for k in w_eager if "lora_B" in k)  # trained: B moved from zero


def test_attention_backend_switch_gives_the_same_velocity_and_names_the_valid_ones():
    """model.attention_backend routes attention through diffusers' dispatcher (the padding merge goes off,
    kernels like flash take no mask); on CPU the math kernel must give the default SDPA's velocity."""
    from leapalign.backbones import load_backbone
    from leapalign.errors import UserError

    default = load_backbone(config.load(None, []).model)
    math_kernel = load_backbone(config.load(None, ["model.attention_backend=_native_math"]).model)
    assert default.merge_padding and not math_kernel.merge_padding
    prompts = ["a red circle to the left of a blue square", "two green triangles"]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = [bb.velocity(x, torch.tensor(0.7), bb.at_resolution(bb.encode_prompts(prompts), 32, 32)) for bb in (default, math_kernel)]
    torch.testing.assert_close(v[1], v[0], rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="not one of diffusers' attention backends: .*flash"):
        load_backbone(config.load(None, ["model.attention_backend=flashy"]).model)
