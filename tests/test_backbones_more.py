"""FLUX.2 (klein and dev) and Qwen-Image adapters must reproduce their diffusers pipelines for the same seed.

Every pipeline here is tiny, random and built offline from configs; the tokenizer is a word-level
`tokenizers` model wrapped in PreTrainedTokenizerFast with a Qwen-style chat template.  Its word
splitting makes Qwen-Image's system prefix exactly 34 tokens, the count the pipeline drops.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leapalign.backbones.flux2 import Flux2KleinBackbone
from leapalign.schedule import scheduler_sigmas
from leapalign.backbones.qwenimage import QwenImageBackbone
from leapalign.rollout import rollout

PROMPTS = ["a red circle", "two blue squares above a green circle", "a small yellow square"]  # different lengths
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ("system user assistant Describe the image by detailing color shape size texture quantity text spatial "
         "relationships of objects and background a red green blue yellow circle circles square squares triangle "
         "two small big above below left right to bad quality blurry").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
MSL = 64  # max_sequence_length for FLUX.2 (prompts are padded to it)
OUT_LAYERS = (1, 2)  # FLUX.2 stacks these hidden layers of its 2-layer text encoder: 2 x 16 = 32 = joint_attention_dim


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + ["[UNK]", "\n", ",", ":", "."] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces go, newlines stay tokens
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:], chat_template=CHAT_TEMPLATE,
                                   padding_side="right", model_max_length=2048)


def _flux2_parts(guidance_embeds: bool, text_layers: int = len(OUT_LAYERS)):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16 * text_layers, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    vae.bn.running_mean.copy_(torch.randn(16) * 0.3)  # non-trivial batch-norm statistics
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return transformer, vae, scheduler


def _finish(pipe):
    for m in (pipe.vae, pipe.text_encoder, pipe.transformer):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_klein(deep: bool = False):
    """`deep`: 28 text-encoder layers, so the pipeline's defaults (layers 9, 18, 27; 512 tokens) work unchanged.

    Flux2KleinPipeline (base, not distilled: real CFG against ""), Qwen3 text encoder; multiples of 4 px."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28 if deep else 2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024 if deep else 128, pad_token_id=tok.pad_token_id,
        bos_token_id=None, eos_token_id=None))
    transformer, vae, scheduler = _flux2_parts(guidance_embeds=False, text_layers=3 if deep else len(OUT_LAYERS))
    return _finish(Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                      transformer=transformer))


def build_flux2_dev():
    """Flux2Pipeline (FLUX.2-dev: guidance embedding, Mistral3 text encoder; its processor is only used for text)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(1)
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]"]})
    n = len(tok)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=n, hidden_size=16, intermediate_size=32, max_position_embeddings=256,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_hidden_layers=2, sliding_window=None,
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=30, patch_size=6),
        image_token_index=n - 1, spatial_merge_size=1))
    transformer, vae, scheduler = _flux2_parts(guidance_embeds=True)
    return _finish(Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer))


def build_qwen():
    """QwenImagePipeline: Qwen2.5-VL text encoder, 3D VAE with latents_mean/std, shift_terminal scheduler; multiples of 8 px."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(2)
    tok = make_tokenizer()
    n = len(tok)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         rope_theta=1e6, vocab_size=n, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=n, hidden_size=16, image_token_id=n - 1, video_token_id=n - 1, vision_start_token_id=n - 1,
        vision_end_token_id=n - 1))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                                 latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.8, 2.0, 1.2])
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=4, max_image_seq_len=64, shift_terminal=0.02)
    return _finish(QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer))


@pytest.fixture(scope="session")
def klein_pipe():
    return build_klein()


@pytest.fixture(scope="session")
def flux2_dev_pipe():
    return build_flux2_dev()


@pytest.fixture(scope="session")
def qwen_pipe():
    return build_qwen()


def _run(pipe, steps, h, w, seed, output_type="latent", **kw):
    """The pipeline's output and its packed latents after every step (via the step-end callback)."""
    states = []

    def keep(_pipe, _i, _t, tensors):
        states.append(tensors["latents"].clone())
        return {}

    with torch.no_grad():
        out = pipe(prompt=PROMPTS, height=h, width=w, num_inference_steps=steps, output_type=output_type,
                   generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep, **kw).images
    return out, torch.stack(states)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _grad_flows(bb, h, w):
    cond = bb.at_resolution(bb.encode_prompts(PROMPTS[:2]), h, w)
    x = bb.initial_noise(2, h, w, torch.Generator().manual_seed(0)).requires_grad_(True)
    bb.transformer.zero_grad(set_to_none=True)
    bb.decode(bb.velocity(x, torch.tensor(0.7), cond), h, w).square().mean().backward()
    grads = {n: p.grad for n, p in bb.transformer.named_parameters() if p.requires_grad}
    # only the text-stream output of the last double-stream block feeds nothing (Qwen-Image has no single blocks)
    last = f"transformer_blocks.{len(bb.transformer.transformer_blocks) - 1}."
    unused = [n for n, g in grads.items() if g is None]
    assert all(n.startswith(last) and any(k in n for k in ("to_add_out", "txt_mlp", "ff_context")) for n in unused), unused
    text_in = [g for n, g in grads.items() if n.startswith(("txt_in", "context_embedder"))]
    assert text_in and all(float(g.abs().sum()) > 0 for g in text_in)
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0 and float(x.grad.abs().sum()) > 0
    bb.transformer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- FLUX.2 [klein]


def _klein(pipe, **kw):
    return Flux2KleinBackbone(pipe, max_sequence_length=MSL, text_encoder_out_layers=OUT_LAYERS, **kw)


KLEIN_KW = dict(max_sequence_length=MSL, text_encoder_out_layers=OUT_LAYERS)


@pytest.mark.parametrize("steps,seed,hw,g", [(3, 0, (16, 16), 4.0), (1, 1, (16, 16), 4.0), (4, 7, (8, 24), 4.0), (3, 2, (16, 16), 1.0)])
def test_klein_rollout_matches_pipeline(klein_pipe, steps, seed, hw, g):
    h, w = hw
    bb = _klein(klein_pipe, guidance_scale=g)
    assert bb.do_cfg == (g > 1)
    traj = rollout(bb, PROMPTS, steps, h, w, generator=torch.Generator().manual_seed(seed))
    ref, states = _run(klein_pipe, steps, h, w, seed, guidance_scale=g, **KLEIN_KW)
    assert torch.equal(traj.sigmas, klein_pipe.scheduler.sigmas)
    _close(traj.states[1:], states)
    # output_type="latent" is the de-normalised, unpatchified VAE latent for klein
    assert ref.shape == (len(PROMPTS), 4, h // 2, w // 2)
    _close(bb.to_latent_image(traj.sample, h, w), ref)
    images, _ = _run(klein_pipe, steps, h, w, seed, output_type="pt", guidance_scale=g, **KLEIN_KW)
    with torch.no_grad():
        _close(bb.decode(traj.sample, h, w), images)


def test_klein_cfg_matters_and_distilled_skips_it(klein_pipe):
    _, with_cfg = _run(klein_pipe, 2, 16, 16, 0, guidance_scale=4.0, **KLEIN_KW)
    _, without = _run(klein_pipe, 2, 16, 16, 0, guidance_scale=1.0, **KLEIN_KW)
    assert (with_cfg - without).abs().max() > 1e-3
    klein_pipe.register_to_config(is_distilled=True)
    try:
        bb = _klein(klein_pipe, guidance_scale=4.0)
        assert not bb.do_cfg
        _, ref = _run(klein_pipe, 2, 16, 16, 0, guidance_scale=4.0, **KLEIN_KW)
        _close(rollout(bb, PROMPTS, 2, 16, 16, generator=torch.Generator().manual_seed(0)).states[1:], ref)
        _close(ref, without)
    finally:
        klein_pipe.register_to_config(is_distilled=False)


def test_klein_gradient_reaches_transformer(klein_pipe):
    _grad_flows(_klein(klein_pipe, guidance_scale=4.0), 16, 16)


def test_klein_encode_images_inverts_normalisation(klein_pipe):
    bb = _klein(klein_pipe)
    img = torch.rand(2, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    x = bb.encode_images(img)
    assert x.shape == bb.initial_noise(2, 16, 8).shape
    _close(bb.to_latent_image(x, 16, 8), bb.vae.encode(img * 2 - 1).latent_dist.mode())


@pytest.mark.parametrize("hw", [(18, 16), (16, 6), (0, 16)])
def test_klein_check_resolution(klein_pipe, hw):
    bb = _klein(klein_pipe)
    bb.check_resolution(16, 8)
    with pytest.raises(ValueError, match=r"multiple of 4.*use e\.g\. \d+x\d+"):
        bb.check_resolution(*hw)


# ---------------------------------------------------------------- FLUX.2 [dev]


@pytest.mark.parametrize("g", [4.0, 1.5])
def test_flux2_dev_rollout_matches_pipeline(flux2_dev_pipe, g):
    bb = Flux2KleinBackbone(flux2_dev_pipe, guidance_scale=g, **KLEIN_KW)
    assert not bb.do_cfg and bb.embedded_guidance
    traj = rollout(bb, PROMPTS, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref, states = _run(flux2_dev_pipe, 3, 16, 16, 0, guidance_scale=g, **KLEIN_KW)
    _close(traj.states[1:], states)
    _close(traj.sample, ref)  # Flux2Pipeline returns the packed tokens for output_type="latent"
    images, _ = _run(flux2_dev_pipe, 3, 16, 16, 0, output_type="pt", guidance_scale=g, **KLEIN_KW)
    with torch.no_grad():
        _close(bb.decode(traj.sample, 16, 16), images)


def test_flux2_dev_guidance_embedding_matters(flux2_dev_pipe):
    a, _ = _run(flux2_dev_pipe, 2, 16, 16, 0, guidance_scale=4.0, **KLEIN_KW)
    b, _ = _run(flux2_dev_pipe, 2, 16, 16, 0, guidance_scale=1.5, **KLEIN_KW)
    assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------- Qwen-Image

CFG = dict(true_cfg_scale=4.0, negative_prompt="bad quality")


@pytest.mark.parametrize("steps,seed,hw,cfg", [(3, 0, (32, 32), True), (2, 1, (16, 48), True), (4, 7, (32, 32), False)])
def test_qwen_rollout_matches_pipeline(qwen_pipe, steps, seed, hw, cfg):
    h, w = hw
    kw = CFG if cfg else dict(true_cfg_scale=1.0)
    bb = QwenImageBackbone(qwen_pipe, guidance_scale=kw["true_cfg_scale"], negative_prompt=kw.get("negative_prompt"))
    assert bb.do_cfg == cfg
    traj = rollout(bb, PROMPTS, steps, h, w, generator=torch.Generator().manual_seed(seed))
    ref, states = _run(qwen_pipe, steps, h, w, seed, **kw)
    assert torch.equal(traj.sigmas, qwen_pipe.scheduler.sigmas)
    _close(traj.states[1:], states)
    _close(traj.sample, ref)  # QwenImagePipeline returns the packed tokens for output_type="latent"
    images, _ = _run(qwen_pipe, steps, h, w, seed, output_type="pt", **kw)
    with torch.no_grad():
        _close(bb.decode(traj.sample, h, w), images)


def test_qwen_cfg_matters_and_follows_the_pipeline_rule(qwen_pipe):
    _, with_cfg = _run(qwen_pipe, 2, 32, 32, 0, **CFG)
    _, without = _run(qwen_pipe, 2, 32, 32, 0, true_cfg_scale=1.0)
    assert (with_cfg - without).abs().max() > 1e-3
    assert QwenImageBackbone(qwen_pipe).do_cfg  # default: true_cfg_scale 4 against ""
    assert QwenImageBackbone(qwen_pipe, true_cfg_scale=4.0, negative_prompt="bad quality").guidance_scale == 4.0
    no_neg = QwenImageBackbone(qwen_pipe, guidance_scale=4.0, negative_prompt=None)  # the pipeline: no negative, no CFG
    assert not no_neg.do_cfg
    _close(rollout(no_neg, PROMPTS, 2, 32, 32, generator=torch.Generator().manual_seed(0)).states[1:], without)


def test_qwen_padding_is_masked(qwen_pipe):
    """Prompts of different lengths are padded per batch; a sub-batch keeps that padding, masked out."""
    bb = QwenImageBackbone(qwen_pipe, **CFG)
    cond = bb.at_resolution(bb.encode_prompts(PROMPTS), 32, 32)
    lengths = cond.batch["mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and cond.batch["embeds"].shape[1] == int(lengths.max())
    x = bb.initial_noise(3, 32, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_all = bb.velocity(x, torch.tensor(0.5), cond)
        v_one = bb.velocity(x[:1], torch.tensor(0.5), bb.at_resolution(bb.encode_prompts(PROMPTS[:1]), 32, 32))
    _close(v_all[:1], v_one)


def test_qwen_gradient_reaches_transformer_through_cfg(qwen_pipe):
    _grad_flows(QwenImageBackbone(qwen_pipe, **CFG), 32, 32)


def test_qwen_encode_images_inverts_normalisation(qwen_pipe):
    bb = QwenImageBackbone(qwen_pipe)
    img = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    x = bb.encode_images(img)
    assert x.shape == bb.initial_noise(2, 16, 32).shape
    _close(bb.to_latent_image(x, 16, 32), bb.vae.encode((img * 2 - 1)[:, :, None]).latent_dist.mode())


def test_qwen_one_step_with_shift_terminal_is_refused(qwen_pipe):
    with pytest.raises(ValueError, match="at least 2"):
        QwenImageBackbone(qwen_pipe).sigmas(1, 32, 32)


@pytest.mark.parametrize("hw", [(36, 32), (32, 4)])
def test_qwen_check_resolution(qwen_pipe, hw):
    bb = QwenImageBackbone(qwen_pipe)
    bb.check_resolution(16, 48)
    with pytest.raises(ValueError, match=r"multiple of 8.*use e\.g\. \d+x\d+"):
        bb.check_resolution(*hw)


# ---------------------------------------------------------------- bfloat16 (the dtype of GPU rollouts)


@pytest.mark.parametrize("family", ["klein", "qwen"])
def test_rollout_matches_pipeline_bit_for_bit_in_bfloat16(request, family):
    """Same timestep rounding and Euler update as the pipelines in bf16, CFG on: equal states, not just close."""
    import copy

    pipe = copy.deepcopy(request.getfixturevalue(f"{family}_pipe"))
    for m in (pipe.transformer, pipe.text_encoder, pipe.vae):
        m.to(torch.bfloat16)
    if family == "klein":
        bb, kw = _klein(pipe, guidance_scale=4.0), dict(guidance_scale=4.0, **KLEIN_KW)
    else:
        bb, kw = QwenImageBackbone(pipe, **CFG), CFG
    traj = rollout(bb, PROMPTS, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, states = _run(pipe, 3, 32, 32, 0, **kw)
    assert traj.states.dtype == states.dtype == torch.bfloat16
    assert torch.equal(traj.states[1:], states)


# ---------------------------------------------------------------- the shared schedule helper


@pytest.mark.parametrize("options", [dict(shift=3.0), dict(use_dynamic_shifting=True, time_shift_type="linear"),
                                     dict(use_dynamic_shifting=True, shift_terminal=0.1), dict(shift=2.0, shift_terminal=0.05)])
def test_scheduler_sigmas_match_the_scheduler(options):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**options)
    for n in (2, 5):
        mu = 0.8 if options.get("use_dynamic_shifting") else None
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        assert torch.equal(scheduler_sigmas(scheduler.config, n, mu), scheduler.sigmas)
