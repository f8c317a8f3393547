"""Shared fixtures: tiny random FLUX pipelines built fully offline from configs.

Two variants:
- `tiny_flux_pipe`: a 1-layer T5, whose padding rows differ (no padding merge happens);
- `tiny_flux_pipe_merged`: the ShapeWorld base's windowed T5, whose padding rows are equal,
  so FluxBackbone merges them into one token with a log-count attention bias.

Both have guidance_embeds=True (the guidance-embedding path is exercised), a VAE with
non-trivial shift/scaling factors, and a dynamically shifted scheduler.

Also shared: `tiny_run_config` (a training config on a saved tiny pipeline, for end-to-end runs) and
`ToyReward` / `Setup` (a rollout of a tiny pipeline with a differentiable toy reward, for gradient tests).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

TEXT_DIM = 32
SCALING_FACTOR = 0.7
SHIFT_FACTOR = 0.15
# VAE with 2 blocks: vae_scale_factor = 2; FLUX resolutions must be multiples of 4.
VAE_BLOCKS = (8, 16)
LATENT_CHANNELS = 4


def _vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        mid_block_add_attention=False,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.register_to_config(scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR)
    assert vae.config.scaling_factor == SCALING_FACTOR and vae.config.shift_factor == SHIFT_FACTOR
    return vae


def _transformer(text_dim: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=4,
        max_image_seq_len=64,
    )


def _text_encoders_one_layer(clip_tok, t5_tok):
    """One CLIP and one plain bidirectional T5 layer (its pads all differ, as T5-XXL's do; the base's windowed T5's do not)."""
    from leapalign.shapeworld import components

    return components.make_text_encoders(clip_tok, t5_tok, width=TEXT_DIM, clip_layers=1, t5_layers=1, heads=2, ff_mult=2,
                                         clip_length=clip_tok.model_max_length, t5_window=None)


def _build(merged: bool):
    from diffusers import FluxPipeline

    from leapalign.shapeworld import components

    torch.manual_seed(1234 if not merged else 4321)
    clip_tok, t5_tok = components.make_tokenizers()
    if merged:
        clip, t5 = components.make_text_encoders(clip_tok, t5_tok)  # the base's windowed T5, TEXT_DIM = 64
        text_dim = components.TEXT_DIM
    else:
        clip, t5 = _text_encoders_one_layer(clip_tok, t5_tok)
        text_dim = TEXT_DIM
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=_transformer(text_dim),
    )
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 ** (len(VAE_BLOCKS) - 1)
    return pipe


@pytest.fixture(scope="session")
def tiny_flux_pipe():
    """Tiny random FluxPipeline whose 1-layer T5 gives distinct padding rows (no merge)."""
    return _build(merged=False)


@pytest.fixture(scope="session")
def tiny_flux_pipe_merged():
    """Tiny random FluxPipeline with the base's windowed T5: equal padding rows, merged by FluxBackbone."""
    return _build(merged=True)


@pytest.fixture(scope="session")
def tiny_flux_pipe_bf16():
    """The 1-layer-T5 variant with every module in bfloat16 (the dtype of GPU rollouts)."""
    pipe = _build(merged=False)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.to(torch.bfloat16)
    return pipe


@pytest.fixture(params=["one_layer_t5", "zero_layer_t5"])
def any_flux_pipe(request):
    """Both variants, for tests that must hold with and without padding merge."""
    name = "tiny_flux_pipe" if request.param == "one_layer_t5" else "tiny_flux_pipe_merged"
    return request.getfixturevalue(name)


def build_tiny_sd3(guidance_dtype=torch.float32, dynamic_shift: bool = False):
    """Tiny random StableDiffusion3Pipeline: CLIP-L and CLIP-G slots (16 wide each), a 1-layer T5, 1 joint block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from leapalign.shapeworld import components

    torch.manual_seed(777)
    clip_tok, t5_tok = components.make_tokenizers()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=clip_tok.model_max_length, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, projection_dim=16))

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                 decoder_start_token_id=t5_tok.pad_token_id, dropout_rate=0.0))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=LATENT_CHANNELS,
                                        pos_embed_max_size=16)
    sched_kw = dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64) if dynamic_shift else {}
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **sched_kw), vae=_vae(),
        text_encoder=clip(), tokenizer=clip_tok, text_encoder_2=clip(), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok, transformer=transformer)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd3_pipe():
    return build_tiny_sd3()


PROMPTS = ["a red circle", "two blue squares above a green circle", "a small yellow square"]


@pytest.fixture
def prompts():
    return list(PROMPTS)


# ---------------------------------------------------------------- gradient comparisons shared by the method tests


def assert_grads_close(a, b, rel=1e-5):
    scale = max(float(t.abs().max()) for t in b)
    assert scale > 0, "reference gradient is zero: the test would be vacuous"
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    assert worst <= rel * scale + 1e-12, f"max |diff| {worst:.3e} vs max |grad| {scale:.3e}"


def grads_differ(a, b, rel=1e-3):
    scale = max(float(t.abs().max()) for t in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) > rel * scale


DATA = Path(__file__).parent / "data"
TINY_PROMPTS = ["a red circle", "two blue squares above a green circle", "a small yellow square", "a cyan triangle"]


def tiny_run_config(tmp_path, model_dir, name, *overrides, prompts=TINY_PROMPTS, reward="brightness"):
    """A training config on the tiny pipeline saved at `model_dir` (16x16), rewarded by tests/data/user_rewards.py:`reward`,
    writing to tmp_path/name.  The settings every tiny end-to-end run shares; a test's `overrides` come last and win."""
    from leapalign import config

    pfile = tmp_path / f"{name}_prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    return config.load(None, [f"model.path={model_dir}", "model.height=16", "model.width=16", f"reward.fn={DATA / 'user_rewards.py'}:{reward}",
                              "reward.lam=1.0", f"output.dir={tmp_path / name}", f"train.prompts={pfile}", f"eval.prompts={pfile}",
                              "train.steps=4", "train.batch_size=2", "train.num_steps=4", "train.lr=1e-2", "eval.num_steps=2",
                              "eval.grid_size=2", "output.tensorboard=false", *overrides])


TOY_SIZE = 16  # H = W of the gradient tests' rollouts
TOY_STEPS = 6
TOY_SCALE = 2.0


class ToyReward:
    """Differentiable: mean brightness plus a fixed random linear function of the image, per sample."""

    name = "toy"

    def __init__(self, seed: int = 0):
        self.R = torch.randn(3, TOY_SIZE, TOY_SIZE, generator=torch.Generator().manual_seed(seed))

    def __call__(self, img: torch.Tensor, prompts=None) -> torch.Tensor:
        return img.mean((1, 2, 3)) + (img * self.R).mean((1, 2, 3))


class Setup:
    """One recorded rollout of a tiny pipeline and a ToyReward whose hinge margin leaves two samples active, one not;
    helpers for the gradients the library computes and the ones a test writes out by hand."""

    def __init__(self, pipe, prompts, seed=0):
        from leapalign.backbones.flux import FluxBackbone
        from leapalign.rollout import rollout

        self.bb = FluxBackbone(pipe)
        self.traj = rollout(self.bb, prompts, TOY_STEPS, TOY_SIZE, TOY_SIZE, generator=torch.Generator().manual_seed(seed),
                            keep_velocities=True)
        self.reward = ToyReward(seed)
        with torch.no_grad():
            r = self.reward(self.decode(self.traj.sample))
        rs = torch.sort(r).values
        self.lam = float((rs[1] + rs[2]) / 2)
        self.B = len(prompts)

    def decode(self, x):
        return self.bb.decode(x, TOY_SIZE, TOY_SIZE)

    def hinge(self, img):
        """Per-sample hinge loss of images."""
        return torch.relu(self.lam - self.reward(img)) * TOY_SCALE

    def loss(self, x):
        """Batch mean of the hinge loss of the decoded latent x."""
        return self.hinge(self.decode(x)).mean()

    def zero(self):
        self.bb.transformer.zero_grad(set_to_none=True)
        self.bb.vae.zero_grad(set_to_none=True)

    def grads(self):
        """The transformer's gradients (zeros where none), then cleared."""
        out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.bb.transformer.parameters()]
        self.zero()
        return out

    def reward_grad(self):
        """G = dL_b/dx_N at the real sample, computed once."""
        x_n = self.traj.sample.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.hinge(self.decode(x_n)).sum(), x_n)
        return g

    def library(self, method, generator=None):
        """Gradient (and infos) of `method` as the trainer back-propagates it."""
        from leapalign.objective import backward_surrogates

        self.grads()
        x = self.traj.sample.detach().requires_grad_(True)
        losses = self.hinge(self.decode(x))
        (g,) = torch.autograd.grad(losses.sum(), x)
        _, infos = backward_surrogates(self.bb, method, self.reward, self.traj, g, losses.detach(),
                                       generator or torch.Generator().manual_seed(0), self.lam, TOY_SCALE)
        return self.grads(), infos

    def reference(self, loss):
        """Gradient of a loss the test wrote out directly."""
        self.grads()
        loss.backward()
        return self.grads()
