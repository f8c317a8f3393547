"""The shipped ShapeWorld base pipeline and ShapeScore reward: load offline, sample, score, rank."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leapalign import shapeworld
from leapalign.shapeworld import world
from leapalign.shapeworld.train_reward import adversarial_images, hard_negatives

ROOT = Path(__file__).resolve().parents[1]


def _weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_shipped_weights_are_small_safetensors():
    assets = shapeworld.ASSETS
    assert not list(assets.rglob("*.bin")) and not list(assets.rglob("*.pt"))
    assert list(assets.rglob("*.safetensors"))
    assert _weight_bytes(assets) < 20 * 2**20


def test_pipeline_loads_offline_and_samples_with_its_own_call(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(shapeworld.BASE_DIR)
    out = pipe(["a red circle", "two blue squares"], height=32, width=32, num_inference_steps=8,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert out.std() > 0.05  # not a blank canvas


def test_reward_is_differentiable_in_the_pixels():
    reward = shapeworld.load_reward()
    img = world.render_batch(["a red circle"], [0]).requires_grad_(True)
    r = reward(img, ["a red circle"])
    r.sum().backward()
    assert r.shape == (1,) and img.grad is not None and img.grad.abs().sum() > 0


def test_reward_ranks_true_caption_above_hard_negatives():
    """Per tag on fresh renders of eval prompts, the issue's 95% target (relations included: swapped objects,
    the opposite relation); 2,000 renders give position 0.963 (docs/shapeworld.md), this half-set a noisier 0.93+."""
    reward = shapeworld.load_reward()
    rng = random.Random(3)
    per_tag: dict[str, list[int]] = {}
    with torch.no_grad():
        for i, row in enumerate(world.prompt_rows("eval")[::2]):
            negs = hard_negatives(row["prompt"], rng)
            img = world.render_batch([row["prompt"]], [50000 + i])
            s = reward(img.expand(len(negs) + 1, -1, -1, -1), [row["prompt"], *negs])
            per_tag.setdefault(row["tag"], []).extend((s[0] > s[1:]).int().tolist())
    acc = {t: sum(v) / len(v) for t, v in per_tag.items()}
    for tag in ("single_object", "two_objects", "counting", "colors", "color_attr"):
        assert acc[tag] >= 0.97, acc
    assert acc["position"] >= 0.93, acc
    overall = sum(sum(v) for v in per_tag.values()) / sum(len(v) for v in per_tag.values())
    assert overall >= 0.97, acc


def test_adversarial_images_stay_within_eps_and_raise_the_training_loss():
    """`train_reward --adversarial`'s PGD: every pixel moves at most eps, and the contrastive loss it attacks rises."""
    import torch.nn.functional as F
    from leapalign.rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess

    reward = shapeworld.load_reward()
    model = reward.model
    prompts = [r["prompt"] for r in world.prompt_rows("eval")[::36]]
    x = world.render_batch(prompts, list(range(len(prompts))))
    ids = reward.tokenizer(prompts, padding="max_length", max_length=model.config.text_config.max_position_embeddings,
                           truncation=True, return_tensors="pt")
    pre = lambda im: preprocess(im, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # noqa: E731
    with torch.no_grad():
        t = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)

    def loss(v):
        return F.cross_entropy(30 * v @ t.T, torch.arange(len(prompts)))

    def embed(im):
        with torch.no_grad():
            return F.normalize(model.get_image_features(pixel_values=pre(im)).pooler_output, dim=-1)

    torch.manual_seed(0)
    adv = adversarial_images(model, pre, x, loss, eps=0.03, steps=2)
    assert adv.shape == x.shape and 0 <= adv.min() and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.03 + 1e-6
    assert loss(embed(adv)) > loss(embed(x)) + 0.05


def test_eval_cli_writes_the_documented_json(tmp_path):
    """Several rewards at once: a mean per reward and a score per prompt for each, plus ShapeEval and a grid."""
    out = tmp_path / "base.json"
    user = ROOT / "tests" / "data" / "user_rewards.py"
    proc = subprocess.run([sys.executable, "-m", "leapalign", "eval", "--prompts", "shapeworld:eval", "--num-images", "12",
                           "--num-steps", "6", "--rewards", f"shapescore,{user}:redness", "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["num_images"] == 12 and set(data["scores"]) == {"shapescore", f"{user}:redness"}
    assert set(data["judges"]["shapeeval"]) >= {"overall", "single_object"}
    assert len(data["per_prompt"]) == 12
    for name, mean in data["scores"].items():
        assert mean == pytest.approx(sum(row[name] for row in data["per_prompt"]) / 12, abs=1e-6)
    assert data["scores"]["shapescore"] != pytest.approx(data["scores"][f"{user}:redness"], abs=1e-3)
    assert out.with_suffix(".png").is_file()


def _undistilled_teacher(folder: Path):
    """A small random ShapeWorld pipeline without a guidance embedding (the shipped VAE, fresh everything else)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from leapalign.shapeworld import components
    from leapalign.shapeworld.pretrain import assemble_pipeline

    torch.manual_seed(0)
    cfg = {**components.TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1, "guidance_embeds": False}
    pipe = assemble_pipeline(folder, transformer=FluxTransformer2DModel(**cfg),
                             vae=AutoencoderKL.from_pretrained(shapeworld.BASE_DIR / "vae"))
    pipe.save_pretrained(folder)
    return pipe


def test_guidance_embedding_starts_as_the_original_transformer(tmp_path):
    from leapalign.backbones.flux import FluxBackbone
    from leapalign.shapeworld.pretrain import with_guidance_embedding

    teacher = _undistilled_teacher(tmp_path)
    bb = FluxBackbone(teacher)
    student = FluxBackbone(teacher)
    student.transformer = with_guidance_embedding(teacher.transformer)
    assert student.transformer.config.guidance_embeds
    cond = bb.at_resolution(bb.encode_prompts(["a red circle", "two blue squares"]), 32, 32)
    x, sigma = torch.randn(2, 16, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = bb.velocity(x, sigma, cond)
        for g in (1.0, 3.5, torch.tensor([2.0, 5.0])):
            student.guidance_scale = g
            assert torch.allclose(student.velocity(x, sigma, cond), ref, atol=1e-6)


def test_folding_the_guidance_embedding_gives_the_distilled_velocity_at_guidance_one():
    """`pretrain --stage flux --init <distilled base>` continues from the shipped base's velocity at guidance 1."""
    from leapalign.backbones.flux import FluxBackbone
    from leapalign.shapeworld.pretrain import without_guidance_embedding

    distilled = shapeworld.load_pipeline()
    bb = FluxBackbone(distilled, guidance_scale=1.0)
    cond = bb.at_resolution(bb.encode_prompts(["a red circle", "a blue square left of a green triangle"]), 32, 32)
    x, sigma = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.95])
    plain = without_guidance_embedding(distilled.transformer)
    assert not plain.config.guidance_embeds
    with torch.no_grad():
        ref = bb.velocity(x, sigma, cond)
        bb.transformer = plain
        torch.testing.assert_close(bb.velocity(x, sigma, cond), ref, rtol=0, atol=1e-5)
        bb.transformer = distilled.transformer
        bb.guidance_scale = 3.5  # a different guidance is a different velocity: the fold is not a no-op
        assert (bb.velocity(x, sigma, cond) - ref).abs().max() > 1e-2


def test_guidance_distillation_learns_the_cfg_velocity_and_saves_a_loadable_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from leapalign.shapeworld.pretrain import cfg_scale, distill_guidance

    assert cfg_scale(torch.tensor(1.0), 2.0) == 1.0 and cfg_scale(torch.tensor(3.5), 2.0) == 2.0
    _undistilled_teacher(tmp_path / "teacher")
    losses = distill_guidance(tmp_path / "student", tmp_path / "teacher", steps=60, batch=16, seed=0, log=lambda m: None,
                              lr=1e-3, num_scenes=256, tag_weights={"position": 2.0})
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    pipe = FluxPipeline.from_pretrained(tmp_path / "student")
    assert pipe.transformer.config.guidance_embeds
    a, b = (pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=g, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images for g in (1.0, 5.0))
    assert (a - b).abs().max() > 1e-3  # the guidance value now changes the sample
    with pytest.raises(ValueError, match="already has a guidance embedding"):
        distill_guidance(tmp_path / "again", tmp_path / "student", steps=1, batch=2, seed=0, log=lambda m: None, num_scenes=8)


def test_robust_accuracy_attack_breaks_the_unrobust_shipped_reward():
    """`robust_accuracy` (printed by train_reward): without an attack the true caption wins; a 0.03 L-inf PGD attack
    flips most of the shipped (non-adversarially trained) reward's rankings (0.315 on 200 renders, docs/shapeworld.md)."""
    from leapalign.shapeworld.train_reward import robust_accuracy

    reward = shapeworld.load_reward()
    clean = robust_accuracy(reward, 48, seed=7, eps=0.0)
    attacked = robust_accuracy(reward, 48, seed=7, eps=0.03)
    assert clean >= 0.95
    assert attacked <= 0.6


def test_shapescore_training_script_runs_and_writes_a_loadable_reward(tmp_path):
    """`python -m leapalign.shapeworld.train_reward` end to end at toy size: a CLIP folder ClipReward loads, and its check."""
    from leapalign.rewards.clip import ClipReward
    from leapalign.shapeworld.train_reward import main

    main(["--out", str(tmp_path / "r"), "--steps", "2", "--batch", "6", "--check", "8", "--image-negs", "1"])
    reward = ClipReward.from_pretrained(tmp_path / "r")
    assert reward(torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"]).shape == (2,)
    assert "overall" in json.loads((tmp_path / "r_accuracy.json").read_text())


def test_windowed_t5_gives_context_only_from_the_words_before_and_equal_padding_rows():
    """The base's T5 slot: word order reaches the transformer (FLUX gives text tokens no position), pads merge."""
    from leapalign.shapeworld import components

    torch.manual_seed(0)
    clip_tok, t5_tok = components.make_tokenizers()
    _, t5 = components.make_text_encoders(clip_tok, t5_tok)
    for block in t5.encoder.block:  # random outputs, as after training (the masked bias must stay masked)
        torch.nn.init.normal_(block.layer[0].SelfAttention.o.weight, std=0.2)
    ids = t5_tok(["a red circle to the left of a blue square", "a blue circle to the left of a red square"],
                 padding="max_length", max_length=components.T5_MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        out = t5(ids).last_hidden_state
        fast = components.encode_t5(t5, ids)
    reach = t5.config.num_layers * (components.T5_WINDOW - 1)
    # the same words in another order: the rows differ from the first swapped word on (a bag of words would not)
    assert not torch.allclose(out[0, 2], out[1, 2], atol=1e-3)
    # causal and local: swapping word 1 changes rows 1 .. 1 + reach only
    changed = (out[0] - out[1]).abs().amax(-1) > 1e-6
    first_pad = int((ids[0] == t5_tok.pad_token_id).nonzero()[0])
    assert changed[1] and not changed[0] and not changed[first_pad + reach + 1:].any()
    # every pad past the receptive field equals the last row, so the backbone merges them; pretraining's short pass agrees
    tail = out[:, first_pad + reach:]
    torch.testing.assert_close(tail, out[:, -1:].expand_as(tail), rtol=0, atol=1e-5)
    torch.testing.assert_close(fast, out, rtol=0, atol=1e-5)


def test_grown_t5_starts_as_the_zero_layer_one():
    from leapalign.shapeworld import components

    torch.manual_seed(0)
    clip_tok, t5_tok = components.make_tokenizers()
    _, flat = components.make_text_encoders(clip_tok, t5_tok, t5_layers=0)
    grown = components.grow_t5(flat)
    assert grown.config.num_layers == components.T5_LAYERS
    ids = t5_tok(["two green triangles"], padding="max_length", max_length=64, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(grown(ids).last_hidden_state, flat(ids).last_hidden_state)


def test_pretraining_can_draw_some_tags_more_often():
    from leapalign.shapeworld import world
    from leapalign.shapeworld.pretrain import make_dataset, parse_tag_weights

    assert parse_tag_weights("position=5") == {"position": 5.0} and parse_tag_weights(None) is None
    with pytest.raises(SystemExit, match="not TAG=WEIGHT"):
        parse_tag_weights("relations=2")
    caps, images = make_dataset(300, 0, {"position": 5})
    share = sum(world.parse(c).tag == "position" for c in caps) / len(caps)
    assert images.shape == (300, 3, 32, 32) and 0.4 < share < 0.6  # 5 / (5 + 5 other tags)


def test_pretraining_noise_levels_can_lean_to_the_noisy_steps():
    """--sigma-mean m draws sigma = sigmoid(N(m, 1)): median 0.5 by default, sigmoid(1) = 0.73 at m = 1."""
    from leapalign.shapeworld.pretrain import CaptionedLatents

    data = CaptionedLatents.__new__(CaptionedLatents)  # the sampling alone, without building a dataset
    data.latents, data.cap_ids, data.empty = torch.zeros(10, 16, 32), torch.arange(10), 10
    data.sigma_tail = (0.0, 1.0)
    for mean, median in ((0.0, 0.5), (1.0, 0.731)):
        data.sigma_mean = mean
        x0, _, noise, sigma, xt = data.noised_batch(4000, torch.Generator().manual_seed(0))
        assert abs(float(sigma.median()) - median) < 0.03, (mean, float(sigma.median()))
        assert torch.allclose(xt, sigma[:, None, None] * noise)  # x0 = 0: x_sigma is the scaled noise


def test_pretraining_can_put_a_share_of_the_noise_levels_near_pure_noise():
    """--sigma-tail 0.25:0.9: a quarter of the levels uniform in [0.9, 1] on top of logit-normal's 1.4% there."""
    from leapalign.shapeworld.pretrain import CaptionedLatents, parse_sigma_tail

    assert parse_sigma_tail("0.25:0.9") == (0.25, 0.9)
    for bad in ("0.25", "1.5:0.9", "0.5:1", "a:b"):
        with pytest.raises(SystemExit, match="--sigma-tail"):
            parse_sigma_tail(bad)
    data = CaptionedLatents.__new__(CaptionedLatents)
    data.latents, data.cap_ids, data.empty = torch.zeros(10, 16, 32), torch.arange(10), 10
    data.sigma_mean, data.sigma_tail = 0.0, (0.25, 0.9)
    _, _, noise, sigma, xt = data.noised_batch(8000, torch.Generator().manual_seed(0))
    share = float((sigma >= 0.9).float().mean())
    assert abs(share - (0.25 + 0.75 * 0.014)) < 0.015 and float(sigma.max()) <= 1.0, share
    assert torch.allclose(xt, sigma[:, None, None] * noise)


def test_pretraining_rejects_bad_options_before_any_stage_runs_or_writes(tmp_path):
    from leapalign.shapeworld.pretrain import main

    for bad in (["--sigma-tail", "0.5:1"], ["--tag-weights", "relations=2"]):
        with pytest.raises(SystemExit):
            main(["--stage", "all", "--out", str(tmp_path / "base"), *bad])
        assert not (tmp_path / "base").exists() and not list(tmp_path.iterdir()), bad
    for teacher in (shapeworld.BASE_DIR, tmp_path / "missing"):  # distilled already; not a pipeline
        with pytest.raises(SystemExit, match="--stage distill"):
            main(["--stage", "distill", "--init", str(teacher), "--out", str(tmp_path / "base")])
        assert not list(tmp_path.iterdir())


def test_t5_window_is_read_from_the_weights_so_the_short_pass_follows_the_encoders_own_window():
    from leapalign.shapeworld import components

    clip_tok, t5_tok = components.make_tokenizers()
    for window in (components.T5_WINDOW, 3, None):
        _, t5 = components.make_text_encoders(clip_tok, t5_tok, t5_window=window)
        assert components.t5_window(t5) == window
    _, t5 = components.make_text_encoders(clip_tok, t5_tok, t5_window=2)
    with torch.no_grad():  # weight decay shrinks the masked buckets; they stay masked
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight[2:].mul_(0.99)
    assert components.t5_window(t5) == 2
    ids = t5_tok(["a red circle to the left of a blue square"], padding="max_length",
                 max_length=components.T5_MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(components.encode_t5(t5, ids), t5(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_flux_stage_continues_from_a_pipeline_folder_into_a_new_one(tmp_path):
    """`pretrain --stage flux --init DIR --out NEW`: NEW has no VAE of its own; DIR's is used and saved."""
    from diffusers import FluxPipeline

    from leapalign.shapeworld.pretrain import train_flux

    _undistilled_teacher(tmp_path / "teacher")
    train_flux(tmp_path / "continued", steps=2, batch=4, seed=0, log=lambda m: None, init=tmp_path / "teacher",
               tag_weights={"position": 3.0}, num_scenes=32)
    pipe = FluxPipeline.from_pretrained(tmp_path / "continued")
    assert pipe.vae.config.scaling_factor == FluxPipeline.from_pretrained(tmp_path / "teacher").vae.config.scaling_factor
