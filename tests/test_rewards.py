"""Real reward models on tiny random weights built here (no network, no open_clip): the open_clip ->
transformers mapping, each built-in's score formula and file layout, preprocessing parity with the
official CLIP image processor, weighted combinations, and the one-line errors."""
from __future__ import annotations

import json
import math
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leapalign.errors import UserError
from leapalign.rewards import BUILTIN, WeightedReward, load_reward, parse_spec
from leapalign.rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
from leapalign.rewards.openclip import load_openclip, openclip_config, openclip_to_transformers

SHAPESCORE = Path(__file__).parents[1] / "src/leapalign/shapeworld/assets/shapescore"
VOCAB, CTX = 126, 16  # the ShapeScore BPE tokenizer: bos 124, eos 125 = the highest id, as in CLIP's BPE
PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach a hub; no test sees the developer's own reward folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LEAPALIGN_REWARD_DIR", raising=False)


# --- an independent open_clip (ViT CLIP) in plain torch, with open_clip's module names -------

class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)  # in_proj_weight / in_proj_bias / out_proj, as open_clip
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=nn.GELU(), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x, mask=None):  # (L, N, D)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for b in self.resblocks:
            x = b(x, mask)
        return x


class RefVisual(nn.Module):
    def __init__(self, width=32, heads=4, layers=2, patch=4, image=16, embed=20):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = RefTransformer(width, heads, layers)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    """open_clip.CLIP (ViT): encode_image, and encode_text pooled at argmax(token ids) under a causal mask."""

    def __init__(self, vision_width=32, vision_heads=4, width=24, heads=2, layers=2, embed=20):
        super().__init__()
        self.visual = RefVisual(vision_width, vision_heads, embed=embed)
        self.transformer = RefTransformer(width, heads, layers)
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # every weight random, layer norms included, so no mix-up can hide
            for name, p in self.named_parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight",
                        "ln_post.weight", "ln_final.weight")) else 0.3 * torch.randn_like(p))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((CTX, CTX), float("-inf")).triu_(1)
        x = self.ln_final(self.transformer(x.transpose(0, 1), mask).transpose(0, 1))
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


def _ref(seed=0, **dims) -> RefCLIP:
    torch.manual_seed(seed)
    return RefCLIP(**dims).eval()


HPS_DIMS = dict(vision_width=128, vision_heads=2, width=64, heads=1)  # head counts as openclip_config infers them (width / 64)


def _openclip_ids(n: int, gen) -> torch.Tensor:
    """open_clip-style tokens: bos, words, eot (the highest id), zero padding."""
    ids = torch.zeros(n, CTX, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, CTX - 1, (1,), generator=gen))
        ids[i, 0], ids[i, 1 : k + 1], ids[i, k + 1 : k + 2] = VOCAB - 2, torch.randint(1, VOCAB - 2, (k,), generator=gen), VOCAB - 1
    return ids


def test_openclip_mapping_matches_an_independent_openclip_forward():
    ref = _ref()
    sd = ref.state_dict()
    cfg = openclip_config(sd, vision_heads=4, text_heads=2)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size,
            cfg.vision_config.image_size, cfg.text_config.hidden_size, cfg.text_config.max_position_embeddings,
            cfg.text_config.vocab_size, cfg.projection_dim, cfg.text_config.eos_token_id) == (32, 2, 4, 16, 24, CTX, VOCAB, 20, VOCAB - 1)
    assert cfg.vision_config.hidden_act == cfg.text_config.hidden_act == "gelu"
    mapped = openclip_to_transformers(sd, cfg)
    assert mapped["visual_projection.weight"].shape == (20, 32) and "vision_model.pre_layrnorm.weight" in mapped
    model = load_openclip({f"module.{k}": v for k, v in sd.items()}, vision_heads=4, text_heads=2)  # DDP prefix too
    gen = torch.Generator().manual_seed(1)
    pix, ids = torch.randn(3, 3, 16, 16, generator=gen), _openclip_ids(3, gen)
    with torch.no_grad():
        want_i, want_t = F.normalize(ref.visual(pix), dim=-1), F.normalize(ref.encode_text(ids), dim=-1)
        got_i = F.normalize(model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
        got_t = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        # transformers' tokenizer pads with eot, not 0: the pooled (first eot) position is the same
        padded = torch.where(ids == 0, VOCAB - 1, ids)
        got_t2 = F.normalize(model.get_text_features(input_ids=padded).pooler_output, dim=-1)
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t2, want_t, atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(ref.logit_scale.item())


def test_openclip_mapping_refuses_unknown_keys():
    sd = dict(_ref().state_dict(), **{"visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(ValueError, match="attn_pool"):
        openclip_to_transformers(sd, openclip_config(sd, vision_heads=4, text_heads=2))


# --- HPSv2 / v2.1 ---------------------------------------------------------------------------

def _bpe_files(folder: Path) -> None:
    """vocab.json + merges.txt, the layout of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = json.loads((SHAPESCORE / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(tok["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="module")
def hps_root(tmp_path_factory):
    """$LEAPALIGN_REWARD_DIR with hpsv2.1/HPS_v2.1_compressed.pt (as a {'state_dict': ...} checkpoint) + tokenizer."""
    root = tmp_path_factory.mktemp("rewards")
    _bpe_files(root / "hpsv2.1")
    torch.save({"state_dict": _ref(**HPS_DIMS).state_dict()}, root / "hpsv2.1" / "HPS_v2.1_compressed.pt")
    return root


def test_hpsv2_is_the_plain_cosine_and_differentiable(hps_root, monkeypatch):
    monkeypatch.setenv("LEAPALIGN_REWARD_DIR", str(hps_root))
    reward = load_reward("hpsv2.1")
    ref = _ref(**HPS_DIMS)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)  # square: pad and crop agree, so the reference can resize
    r = reward(images, PROMPTS)
    ids = reward.fn.tokenizer(PROMPTS, padding="max_length", max_length=CTX, return_tensors="pt").input_ids
    ids = torch.where(torch.cumsum(ids == VOCAB - 1, 1) > 1, 0, ids)  # open_clip pads with 0 after the eot
    with torch.no_grad():
        pix = preprocess(images, 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        want = (F.normalize(ref.visual(pix), dim=-1) * F.normalize(ref.encode_text(ids), dim=-1)).sum(-1)
    torch.testing.assert_close(r, want, atol=1e-5, rtol=0)
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    # the checkpoint file itself as reward.path, non-square input letterboxed
    reward2 = load_reward("hpsv2.1", str(hps_root / "hpsv2.1" / "HPS_v2.1_compressed.pt"))
    assert reward2.fn.resize == "pad" and reward2(torch.rand(2, 3, 24, 40), PROMPTS).shape == (2,)


def test_pad_resize_is_open_clips_resize_max_size():
    x = torch.rand(1, 3, 10, 20)
    out = preprocess(x, 16, (0, 0, 0), (1, 1, 1), resize="pad")
    assert out.shape == (1, 3, 16, 16)
    assert out[..., :4, :].abs().max() == 0 and out[..., 12:, :].abs().max() == 0  # 8 rows of image, 4 of zeros each side
    torch.testing.assert_close(out[..., 4:12, :], F.interpolate(x, (8, 16), mode="bicubic", antialias=True, align_corners=False))


@pytest.mark.parametrize("name, file, url", [
    ("hpsv2.1", "HPS_v2.1_compressed.pt", "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"),
    ("hpsv2", "HPS_v2_compressed.pt", "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2_compressed.pt"),
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"),
    ("pickscore", "", "https://huggingface.co/yuvalkirstain/PickScore_v1"),
    ("clipscore", "", "https://huggingface.co/openai/clip-vit-large-patch14"),
])
def test_missing_weights_are_one_line_naming_file_place_and_url(tmp_path, monkeypatch, name, file, url):
    monkeypatch.setenv("LEAPALIGN_REWARD_DIR", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_reward(name)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(tmp_path / name / file) in msg, msg
    monkeypatch.delenv("LEAPALIGN_REWARD_DIR")
    with pytest.raises(UserError, match=r"\$LEAPALIGN_REWARD_DIR"):  # nothing configured, hub off
        load_reward(name)


def test_hps_without_tokenizer_files_names_them(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(UserError, match="vocab.json and merges.txt .*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_reward("hpsv2.1", str(tmp_path))


# --- transformers CLIP folders: PickScore, CLIP score, aesthetic ------------------------------

def _tiny_clip(folder: Path, seed: int, tokenizer: bool = True):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=CTX, bos_token_id=124, eos_token_id=125, pad_token_id=125),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        image_size=16, patch_size=4), projection_dim=20, logit_scale_init_value=math.log(50.0))
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    if tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            shutil.copy(SHAPESCORE / f, folder / f)
    return model


def _hand_cos(model, tokenizer, images, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=CTX, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                    pixel_values=preprocess(images, 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    """One folder with pickscore/ (model + processor/ subfolder), clipscore/ and aesthetic/ (CLIP + MLP file)."""
    root = tmp_path_factory.mktemp("cliprewards")
    _tiny_clip(root / "pickscore", 1, tokenizer=False)
    (root / "pickscore" / "processor").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(SHAPESCORE / f, root / "pickscore" / "processor" / f)
    _tiny_clip(root / "clipscore", 2)
    _tiny_clip(root / "aesthetic", 3, tokenizer=False)
    torch.manual_seed(4)
    dims = [20, 16, 8, 6, 4, 1]  # LAION: 768, 1024, 128, 64, 16, 1
    mlp = {f"layers.{i}.{k}": torch.randn(dims[j + 1], dims[j]) if k == "weight" else torch.randn(dims[j + 1])
           for j, i in enumerate((0, 2, 4, 6, 7)) for k in ("weight", "bias")}
    torch.save(mlp, root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    return root


def test_pickscore_is_logit_scale_times_cosine(clip_root):
    from transformers import CLIPModel

    reward = load_reward("pickscore", str(clip_root / "pickscore"))
    images = torch.rand(2, 3, 40, 24)
    model = CLIPModel.from_pretrained(clip_root / "pickscore")
    want = 50.0 * _hand_cos(model, reward.fn.tokenizer, images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS), want, atol=1e-4, rtol=1e-5)


def test_clipscore_is_hessels_2_5_max_cos_0(clip_root):
    from transformers import CLIPModel

    reward = load_reward("clipscore", str(clip_root / "clipscore"))
    images = torch.rand(4, 3, 16, 16)
    prompts = PROMPTS * 2
    cos = _hand_cos(CLIPModel.from_pretrained(clip_root / "clipscore"), reward.fn.tokenizer, images, prompts)
    r1 = reward(images, prompts)
    torch.testing.assert_close(r1, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=0)
    with torch.no_grad():  # cos -> -cos: every value now lands on the other side of the floor
        reward.fn.model.text_projection.weight.neg_()
    reward.fn._text_cache.clear()
    r2 = reward(images, prompts)
    torch.testing.assert_close(r2, 2.5 * (-cos).clamp_min(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(r1 + r2, 2.5 * cos.abs(), atol=1e-5, rtol=0)


def test_aesthetic_is_the_laion_mlp_on_normalised_clip_image_embeddings(clip_root):
    from transformers import CLIPModel

    reward = load_reward("aesthetic", str(clip_root / "aesthetic"))
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    r = reward(images, ["ignored", "ignored"])
    model = CLIPModel.from_pretrained(clip_root / "aesthetic")
    mlp = torch.load(clip_root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    with torch.no_grad():
        x = F.normalize(model.get_image_features(pixel_values=preprocess(images, 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).pooler_output, dim=-1)
        for i in (0, 2, 4, 6, 7):  # linear layers only: the LAION MLP has no activations
            x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    torch.testing.assert_close(r, x[:, 0], atol=1e-5, rtol=1e-5)
    r.sum().backward()
    assert images.grad.abs().sum() > 0


def test_imagereward_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails as when not installed
    with pytest.raises(UserError, match="pip install image-reward"):
        load_reward("imagereward")


def test_imagereward_wrapper_calls_score_gard(monkeypatch, tmp_path):
    """The package itself cannot be installed here: a stand-in checks the glue (tokens, pixels, shape)."""
    from transformers import BatchEncoding

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.blip = types.SimpleNamespace(tokenizer=lambda p, **kw: BatchEncoding(
                {"input_ids": torch.ones(len(p), kw["max_length"], dtype=torch.long), "attention_mask": torch.ones(len(p), kw["max_length"])}))

        def score_gard(self, ids, mask, image):
            assert ids.shape == (len(image), 35) and image.shape[1:] == (3, 224, 224)
            return (image.mean((2, 3)) * self.w).sum(-1, keepdim=True)

    calls = []
    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device="cpu", med_config=None: calls.append((name, med_config)) or Fake()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    (tmp_path / "ImageReward.pt").touch()
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    r = load_reward("imagereward", str(tmp_path))(images, PROMPTS)
    assert r.shape == (2,) and calls == [(str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json"))]
    r.sum().backward()
    assert images.grad.abs().sum() > 0


# --- preprocessing parity with the official CLIP image processor -------------------------------

def test_preprocess_matches_clip_image_processor_within_measured_tolerance():
    """clip.preprocess on [0,1] tensors vs transformers' CLIPImageProcessorPil on the same uint8 PIL image
    (shortest edge, centre crop, OpenAI mean/std). Measured max |diff| in normalised units: 0.0149 (mean
    0.004) when shrinking, the case of generated images; PIL resizes uint8 and rounds to 1/255 (= 0.015
    normalised). Same geometry, same kernel: against PIL's float ('F') bicubic the diff is 3e-6.
    Enlarging a pure-noise image differs more (up to 0.34: PIL clamps between its two uint8 passes)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    for (h, w), size in [((61, 97), 24), ((97, 61), 24), ((300, 224), 24), ((1024, 768), 224)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        want = torch.as_tensor(np.asarray(proc(Image.fromarray(arr), return_tensors="np")["pixel_values"]))
        got = preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        assert got.shape == want.shape
        diff = (got - want).abs()
        assert diff.max() < 0.02 and diff.mean() < 0.006, ((h, w), diff.max().item(), diff.mean().item())
    # the kernel itself: PIL float-mode bicubic == torch antialiased bicubic
    arr = rng.random((61, 97)).astype(np.float32)
    want = np.asarray(Image.fromarray(arr, mode="F").resize((38, 24), Image.BICUBIC))
    got = F.interpolate(torch.from_numpy(arr)[None, None], size=(24, 38), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    assert np.abs(got.numpy() - want).max() < 1e-5


# --- weighted combinations -------------------------------------------------------------------

def _user_rewards(tmp_path: Path) -> str:
    f = tmp_path / "my_rewards.py"
    f.write_text("def red(images, prompts):\n    return images[:, 0].mean((1, 2))\n\n"
                 "def contrast(images, prompts):\n    return images.std((1, 2, 3))\n")
    return str(f)


def test_weighted_sum_is_exact_and_exposes_each_component(tmp_path):
    f = _user_rewards(tmp_path)
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    prompts = ["x"] * 3
    red, contrast = load_reward(f"{f}:red"), load_reward(f"{f}:contrast")
    want = 1.0 * red(images, prompts) + 0.5 * contrast(images, prompts)
    for spec in ({f"{f}:red": 1.0, f"{f}:contrast": 0.5}, f"{f}:red=1.0, {f}:contrast=0.5"):
        reward = load_reward(spec)
        assert isinstance(reward.fn, WeightedReward)
        r, parts = reward.score(images, prompts)
        assert torch.equal(r, want) and torch.equal(reward(images, prompts), want)
        assert list(parts) == [f"{f}:red", f"{f}:contrast"]
        assert torch.equal(parts[f"{f}:contrast"], contrast(images, prompts).detach())
    r.sum().backward()
    assert images.grad.abs().sum() > 0
    _, single = load_reward(f"{f}:red").score(images, prompts)
    assert list(single) == [f"{f}:red"]  # one reward reports itself the same way
    assert not hasattr(load_reward(f"{f}:red"), "last_components")  # no side channel


def test_non_finite_values_are_an_error_unless_the_caller_takes_them(tmp_path):
    """A reward call refuses NaN; the trainer (and an evaluation) asks for the values and skips or reports them."""
    from leapalign.rewards import scores

    f = _user_rewards(tmp_path)
    (tmp_path / "nan.py").write_text("def nan(images, prompts):\n    return images.mean((1, 2, 3)) * float('nan')\n")
    reward = load_reward(f"{f}:red=1,{tmp_path / 'nan.py'}:nan=0.5")
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError, match="non-finite"):
        reward(images, ["x", "y"])
    values, parts = scores(reward, images, ["x", "y"])
    assert torch.isnan(values).all() and torch.isnan(parts[f"{tmp_path / 'nan.py'}:nan"]).all()
    assert torch.isfinite(parts[f"{f}:red"]).all()


def test_combination_of_builtins_from_one_root_folder(clip_root):
    reward = load_reward("pickscore=0.25,clipscore=2", str(clip_root))
    images = torch.rand(2, 3, 16, 16)
    r, c = reward.score(images, PROMPTS)
    assert torch.equal(r, 0.25 * c["pickscore"] + 2 * c["clipscore"])
    torch.testing.assert_close(c["clipscore"], load_reward("clipscore", str(clip_root / "clipscore"))(images, PROMPTS))


@pytest.mark.parametrize("spec, fragment", [
    ("hpsv21=1.0,pickscore=0.5", "did you mean 'hpsv2.1'"),
    ({"pickscor": 1.0}, "did you mean 'pickscore'"),
    ("hpsv2.1=abc", "name=weight"),
    ("hpsv2.1=1,hpsv2.1=2", "twice"),
    ("pickscore=inf", "finite"),
])
def test_bad_combination_specs_are_clear(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        load_reward(spec)


def test_spec_parsing_and_builtin_names():
    assert parse_spec("hpsv2.1") is None
    assert parse_spec("hpsv2.1=1.0,pickscore=0.5") == {"hpsv2.1": 1.0, "pickscore": 0.5}
    assert parse_spec("a.py:f,b") == {"a.py:f": 1.0, "b": 1.0}
    assert {"shapescore", "hpsv2", "hpsv2.1", "pickscore", "clipscore", "aesthetic", "imagereward"} <= set(BUILTIN)


def test_cached_text_embeddings_do_not_depend_on_the_batch(clip_root):
    """Each prompt is encoded on its own, so its embedding is the same bits whichever prompts came with it first
    (a resumed run meets its prompts in other batches; the last bits of a batched matmul depend on its size)."""
    together = load_reward("clipscore", str(clip_root / "clipscore")).fn.text_embeds(PROMPTS + ["a green square", "a cat"])
    for i, p in enumerate(PROMPTS):
        alone = load_reward("clipscore", str(clip_root / "clipscore")).fn.text_embeds([p])
        assert torch.equal(alone[0], together[i])
