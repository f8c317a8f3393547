"""CLIP-style rewards: scaled cosine similarity of image and prompt embeddings.

One class serves ShapeScore (the embedded world's reward), HPSv2/v2.1 (open_clip weights mapped
onto CLIPModel, see openclip.py), PickScore and CLIP score: a `transformers.CLIPModel` plus its tokenizer, with image preprocessing done in torch so the
reward is differentiable with respect to the pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int, mean, std, resize: str = "crop") -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> CLIP input, differentiable: bicubic antialiased resize, then normalise.

    resize="crop": short side to `size`, long side int(size * long / short), centre crop (CLIP,
    CLIPImageProcessor, torchvision Resize + CenterCrop). resize="pad": long side to `size`, short
    side round(size * short / long), zero padding centred (open_clip's ResizeMaxSize, used by HPSv2).
    """
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        if resize == "crop":
            nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        elif resize == "pad":
            scale = size / max(h, w)
            nh, nw = round(h * scale), round(w * scale)
        else:
            raise ValueError(f"resize must be 'crop' or 'pad', not {resize!r}")
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        if resize == "crop":
            top, left = (nh - size) // 2, (nw - size) // 2
            images = images[..., top : top + size, left : left + size]
        else:
            ph, pw = size - nh, size - nw
            images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - m) / s


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns an output object whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipReward(torch.nn.Module):
    """reward(images in [0,1] (B,3,H,W), prompts) -> (B,) = scale * cos(image, text), differentiable in images.

    floor: if set, cos is clamped below at it first (CLIPScore: 2.5 * max(cos, 0)).
    resize: how a non-square image reaches the model's square input, see `preprocess`.
    """

    def __init__(self, model, tokenizer, scale: float = 1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 floor: float | None = None, resize: str = "crop"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scale, self.floor, self.resize = scale, floor, resize
        self.mean, self.std = tuple(mean), tuple(std)
        self.size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings  # a bare vocab.json tokenizer has no limit
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path, scale: float = 1.0, tokenizer_path=None, **kwargs) -> "ClipReward":
        """A transformers CLIP folder (or hub id); the tokenizer from `tokenizer_path` if given.

        Normalisation mean/std come from a local preprocessor_config.json (tokenizer folder first),
        else OpenAI CLIP's, which every CLIP-H/L reward here uses.
        """
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path) if Path(path).exists() else str(path)
        if isinstance(path, Path) and not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP reward model at {path} (expected config.json and model.safetensors there)")
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        for folder in (tokenizer_path, path):
            pre = Path(folder) / "preprocessor_config.json" if folder is not None else None
            if pre is not None and pre.is_file():
                cfg = json.loads(pre.read_text())
                mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
                break
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path or path)
        return cls(CLIPModel.from_pretrained(path), tokenizer, scale, mean, std, **kwargs)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Each distinct prompt encoded once, on its own: a batch's size changes the last bits of a matmul, so an
        embedding must not depend on which prompts first came with it (a resumed run meets them in other batches)."""
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                ids = self.tokenizer([p], padding="max_length", truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.model.device)
                with torch.no_grad():
                    self._text_cache[p] = F.normalize(_features(self.model.get_text_features(**ids)), dim=-1)[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.model.dtype), self.size, self.mean, self.std, self.resize)
        return F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts).to(images.dtype)).sum(-1).float()
        if self.floor is not None:
            cos = cos.clamp_min(self.floor)
        return self.scale * cos

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()  # cached text embeddings live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)
