"""The real reward models (HPSv2/v2.1, PickScore, CLIP score, LAION aesthetic, ImageReward): where
their files live and how each is built. See docs/rewards.md.

Files are looked up, for the reward NAME, in:
1. `path` (the config key reward.path): a folder, the checkpoint file itself, or a hub id;
2. $LEAPALIGN_REWARD_DIR/NAME/ when reward.path is not set;
3. the reward's hub repository, only when neither is set and HF_HUB_OFFLINE is not set.
A missing file is one UserError saying which file is expected where and where to download it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipReward, _features, preprocess

ENV = "LEAPALIGN_REWARD_DIR"
LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # tokenizer / processor of HPSv2 and PickScore
CLIP_L14 = "openai/clip-vit-large-patch14"  # CLIP score; the aesthetic predictor's image encoder
HF = "https://huggingface.co"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{AESTHETIC_FILE}"
TOKENIZER_FILES = "vocab.json and merges.txt (or tokenizer.json)"


def hub_allowed() -> bool:
    """HF_HUB_OFFLINE unset (or false): hub ids may go through from_pretrained / hf_hub_download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("", "0", "false", "no", "off")


def configured(name: str, path) -> Path | None:
    """reward.path, else $LEAPALIGN_REWARD_DIR/NAME; None when neither is set."""
    if path:
        return Path(path).expanduser()
    root = os.environ.get(ENV)
    return Path(root).expanduser() / name if root else None


def _where(name: str, loc: Path | None, file: str) -> str:
    if loc is None:
        return f"${ENV}/{name}/{file} (neither reward.path nor {ENV} is set, and the hub is {'unreachable' if hub_allowed() else 'off: HF_HUB_OFFLINE'})"
    return str(loc if loc.is_file() or loc.suffix in (".pt", ".pth") else loc / file)


def _hub_id(path) -> str | None:
    """`path` as a hub id ("owner/name") when it is not a local path."""
    p = str(path or "")
    if p and not Path(p).expanduser().exists() and p.count("/") == 1 and not p.startswith((".", "/", "~")):
        return p
    return None


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and ((folder / "tokenizer.json").is_file() or
                                   ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()))


def _clip_tokenizer(name: str, folders: list, what: str):
    """A CLIPTokenizer from the first folder holding tokenizer files, else laion's CLIP-H tokenizer from the hub."""
    from transformers import CLIPTokenizer

    for folder in folders:
        if _has_tokenizer(folder):
            return CLIPTokenizer.from_pretrained(folder), folder
    err = ""
    if hub_allowed():
        try:
            return CLIPTokenizer.from_pretrained(LAION_H14), LAION_H14
        except Exception as e:  # no network: fall through to the message below
            err = f" (hub: {type(e).__name__})"
    place = folders[0] if folders and folders[0] is not None else Path(f"${ENV}/{name}")
    raise UserError(f"reward {name} needs the {what} tokenizer files {TOKENIZER_FILES} in {place}; download them from "
                    f"{HF}/{LAION_H14}/tree/main (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json){err}")


def _model_source(name: str, path, hub_id: str, url: str) -> str | Path:
    """A local transformers CLIP folder, or a hub id when nothing local is configured and the hub is allowed."""
    hub = _hub_id(path)
    if hub is not None:
        if not hub_allowed():
            raise UserError(f"reward {name}: reward.path {hub!r} is neither a folder nor usable as a hub id while HF_HUB_OFFLINE is set")
        return hub
    loc = configured(name, path)
    if loc is not None and (loc / "config.json").is_file():
        return loc
    if loc is None and hub_allowed():
        return hub_id
    raise UserError(f"reward {name} needs a transformers CLIP folder (config.json, model.safetensors or pytorch_model.bin) "
                    f"at {_where(name, loc, '')}; download it from {url}")


def _from_pretrained(name: str, src, **kwargs) -> ClipReward:
    try:
        return ClipReward.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:  # hub unreachable, a half-downloaded folder: one line, not a traceback
        raise UserError(f"reward {name}: loading the CLIP model from {src} failed: {str(e).splitlines()[0]}") from None


# --- HPSv2 / HPSv2.1 -------------------------------------------------------------------------

def hpsv2(name: str, path=None) -> ClipReward:
    """HPSv2 / v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tune; score = cos(image, text), no logit scale.

    Images are letterboxed like HPSv2's evaluation transform (open_clip ResizeMaxSize: long side to
    224, zero padding); square images are simply resized.
    """
    from .openclip import load_openclip

    file = HPS_FILES[name]
    loc = configured(name, path)
    ckpt = loc if loc is not None and loc.is_file() else (loc / file if loc is not None else None)
    if ckpt is None or not ckpt.is_file():
        ckpt = None
        if loc is None and hub_allowed():
            try:
                from huggingface_hub import hf_hub_download

                ckpt = Path(hf_hub_download("xswu/HPSv2", file))
            except Exception:
                ckpt = None
        if ckpt is None:
            raise UserError(f"reward {name} needs {file} at {_where(name, loc, file)}; download it from "
                            f"{HF}/xswu/HPSv2/resolve/main/{file}")
    tokenizer, _ = _clip_tokenizer(name, [ckpt.parent], "open_clip / CLIP BPE")
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = load_openclip(sd.get("state_dict", sd))
    except Exception as e:
        raise UserError(f"reward {name}: {ckpt} is not an open_clip ViT CLIP checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    eos = model.config.text_config.eos_token_id
    if tokenizer.eos_token_id != eos:
        raise UserError(f"reward {name}: the tokenizer's end-of-text id is {tokenizer.eos_token_id}, the model pools at {eos}; "
                        f"use the CLIP BPE tokenizer files of {LAION_H14}")
    return ClipReward(model, tokenizer, 1.0, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="pad")


# --- PickScore, CLIP score -------------------------------------------------------------------

def pickscore(name: str = "pickscore", path=None) -> ClipReward:
    """PickScore (Kirstain et al. 2023): CLIP-H fine-tune; score = logit_scale.exp() * cos (about 100 * cos)."""
    src = _model_source(name, path, "yuvalkirstain/PickScore_v1", f"{HF}/yuvalkirstain/PickScore_v1")
    tok = None
    if isinstance(src, Path):
        tok = next((f for f in (src, src / "processor") if _has_tokenizer(f)), None)
        if tok is None:
            tok = _clip_tokenizer(name, [src, src / "processor"], "CLIP-H processor")[1]
    reward = _from_pretrained(name, src, tokenizer_path=tok or LAION_H14)
    reward.scale = reward.model.logit_scale.exp().item()
    return reward


def clipscore(name: str = "clipscore", path=None) -> ClipReward:
    """CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0) with CLIP ViT-L/14 by default."""
    src = _model_source(name, path, CLIP_L14, f"{HF}/{CLIP_L14}")
    return _from_pretrained(name, src, scale=2.5, floor=0.0)


# --- LAION aesthetic predictor v2 ------------------------------------------------------------

class AestheticReward(torch.nn.Module):
    """LAION improved aesthetic predictor v2: MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt unused)."""

    def __init__(self, clip, mlp_state: dict, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        dims = [mlp_state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
        nn = torch.nn
        self.mlp = nn.Sequential(nn.Linear(dims[0][1], dims[0][0]), nn.Dropout(0.2), nn.Linear(dims[1][1], dims[1][0]),
                                 nn.Dropout(0.2), nn.Linear(dims[2][1], dims[2][0]), nn.Dropout(0.1),
                                 nn.Linear(dims[3][1], dims[3][0]), nn.Linear(dims[4][1], dims[4][0]))
        self.mlp.load_state_dict({k.removeprefix("layers."): v for k, v in mlp_state.items()})
        self.mlp.eval().requires_grad_(False)
        self.size, self.mean, self.std = clip.config.vision_config.image_size, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = preprocess(images.to(self.clip.dtype), self.size, self.mean, self.std)
        e = F.normalize(_features(self.clip.get_image_features(pixel_values=x)), dim=-1)
        return self.mlp(e.to(self.mlp[0].weight.dtype)).squeeze(-1).float()


def aesthetic(name: str = "aesthetic", path=None) -> AestheticReward:
    """The MLP file from reward.path / $LEAPALIGN_REWARD_DIR/aesthetic; its CLIP ViT-L/14 from the same
    folder if it holds config.json, else from the clipscore location, else the hub."""
    from transformers import CLIPModel

    loc = configured(name, path)
    ckpt = loc if loc is not None and loc.is_file() else (loc / AESTHETIC_FILE if loc is not None else None)
    if ckpt is None or not ckpt.is_file():
        raise UserError(f"reward {name} needs {AESTHETIC_FILE} at {_where(name, loc, AESTHETIC_FILE)}; download it from {AESTHETIC_URL}")
    try:
        mlp_state = torch.load(ckpt, map_location="cpu", weights_only=True)
        mlp_state = mlp_state.get("state_dict", mlp_state)
    except Exception as e:
        raise UserError(f"reward {name}: cannot read {ckpt} ({type(e).__name__}: {e})") from None
    if (ckpt.parent / "config.json").is_file():
        src = ckpt.parent
    else:
        try:
            src = _model_source("clipscore", None, CLIP_L14, "")
        except UserError:
            raise UserError(f"reward {name} needs CLIP ViT-L/14 as a transformers folder (config.json, model.safetensors) beside "
                            f"{AESTHETIC_FILE} in {ckpt.parent}, or in ${ENV}/clipscore; download it from {HF}/{CLIP_L14}") from None
    try:
        return AestheticReward(CLIPModel.from_pretrained(src), mlp_state)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"reward {name}: loading CLIP ViT-L/14 from {src} with {ckpt.name} failed: {str(e).splitlines()[0]}") from None


# --- ImageReward (optional package) ----------------------------------------------------------

class ImageRewardModel(torch.nn.Module):
    """ImageReward v1.0 (Xu et al. 2023), BLIP-based, through the image-reward package's score_gard.

    Preprocessing as the package's own: bicubic resize of the short side to 224, centre crop, CLIP mean/std;
    prompts as the package tokenises them (BERT, max length 35).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = preprocess(images, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        ids = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(x.device)
        self.model.device = x.device  # score_gard builds its attention mask on model.device
        return self.model.score_gard(ids.input_ids, ids.attention_mask, x).reshape(-1).float()


def imagereward(name: str = "imagereward", path=None) -> ImageRewardModel:
    try:
        import ImageReward as RM
    except ImportError:
        raise UserError("reward imagereward needs the optional package image-reward: `pip install image-reward` (it pulls in "
                        "timm==0.6.13, fairscale==0.4.13, datasets, accelerate and torchvision, and targets transformers 4.x; "
                        "on first use it fetches ImageReward.pt and med_config.json from huggingface.co/THUDM/ImageReward "
                        "and the bert-base-uncased tokenizer)") from None
    loc = configured(name, path)
    try:
        if loc is not None and (loc / "ImageReward.pt").is_file():
            model = RM.load(str(loc / "ImageReward.pt"), device="cpu", med_config=str(loc / "med_config.json"))
        elif loc is None and hub_allowed():
            model = RM.load("ImageReward-v1.0", device="cpu")
        else:
            raise UserError(f"reward {name} needs ImageReward.pt and med_config.json in {_where(name, loc, '')}; download "
                            f"them from {HF}/THUDM/ImageReward/resolve/main/ImageReward.pt and .../med_config.json")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"reward {name}: loading ImageReward failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return ImageRewardModel(model)
