"""CLIP-style rewards: scaled cosine similarity of image and prompt embeddings.

One class serves ShapeScore (the embedded world's reward), PickScore and CLIP score: a
`transformers.CLIPModel` plus its tokenizer, with image preprocessing done in torch so the
reward is differentiable with respect to the pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> CLIP input: bicubic antialiased resize of the short side, centre crop, normalise."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - m) / s


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns an output object whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipReward(torch.nn.Module):
    """reward(images in [0,1] (B,3,H,W), prompts) -> (B,) = scale * cos(image, text), differentiable in images."""

    def __init__(self, model, tokenizer, scale: float = 1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scale = scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.size = model.config.vision_config.image_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path, scale: float = 1.0) -> "ClipReward":
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP reward model at {path} (expected config.json and model.safetensors there)")
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(CLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path), scale, mean, std)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", truncation=True, return_tensors="pt").to(self.model.device)
            with torch.no_grad():
                e = F.normalize(_features(self.model.get_text_features(**ids)), dim=-1)
            self._text_cache.update(zip(missing, e))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.model.dtype), self.size, self.mean, self.std)
        return F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * (self.image_embeds(images) * self.text_embeds(prompts).to(images.dtype)).sum(-1).float()
