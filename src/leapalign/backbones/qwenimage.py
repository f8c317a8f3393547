"""Qwen-Image adapter: a diffusers QwenImagePipeline seen as velocity(x, sigma, cond).

Latents are packed 2x2 tokens exactly like FLUX.1's (flux.pack_latents).  Prompt encodings have
a different length per prompt (the pipeline keeps only the valid tokens and pads each batch to
its longest with a mask), so they are cached unpadded and padded per batch.  With true CFG
(guidance_scale > 1 and a negative prompt) every velocity is the pipeline's guided one,
norm-rescaled to the conditional prediction's norm, gradient steps included.
"""
from __future__ import annotations

import contextlib


import torch

from .. import schedule
from .base import Backbone, Conditioning, grid_layout
from .flux import pack_latents, unpack_latents


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, D) tensors zero-padded to the longest, with a (B, L) 0/1 mask, as the pipeline does."""
    n = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(n, device=r.device) < r.shape[0] for r in rows]).long()
    return embeds, mask


class QwenImageBackbone(Backbone):
    """Qwen-Image through QwenImagePipeline; `guidance_scale` is the pipeline's `true_cfg_scale`."""

    family = "Qwen-Image"

    def __init__(self, pipe, guidance_scale: float = 4.0, max_sequence_length: int | None = None,
                 negative_prompt: str | None = "", true_cfg_scale: float | None = None, detach_uncond: bool = False):
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        super().__init__(pipe, true_cfg_scale if true_cfg_scale is not None else guidance_scale, max_sequence_length)
        if self.max_sequence_length > 1024:
            raise ValueError(f"max_sequence_length cannot be greater than 1024 for Qwen-Image, got {self.max_sequence_length}")
        self.negative_prompt = negative_prompt  # None: no CFG, as in the pipeline
        self.detach_uncond = detach_uncond  # no reference trains Qwen-Image: the exact gradient by default

    @property
    def true_cfg_scale(self) -> float:
        return self.guidance_scale

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1 and self.negative_prompt is not None  # the pipeline's rule

    # ------------------------------------------------------------------ prompts
    def _rows(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's valid-token encodings (L_i, D), encoded once (right padding: batch-independent)."""
        def encode(new):
            embeds, mask = self.pipe.encode_prompt(prompt=new, device=self.encode_device, max_sequence_length=self.max_sequence_length)
            lengths = mask.sum(1).tolist() if mask is not None else [embeds.shape[1]] * len(new)
            return [(e[:n],) for e, n in zip(embeds, lengths)]

        return self.cached_encodings(prompts, encode, stack=False)[0]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask = pad_rows(self._rows(prompts))
        shared = {}
        if self.do_cfg:  # one row, broadcast over the batch (the same prompt: no padding, no mask)
            shared["neg_embeds"] = self._rows([self.negative_prompt])[0]
        return Conditioning({"embeds": embeds, "mask": mask}, shared)

    # ------------------------------------------------------------------ geometry and schedule
    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def at_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        h, w = self.latent_hw(height, width)
        return Conditioning(cond.batch, {**cond.shared, "img_shape": torch.tensor([1, h // 2, w // 2])})

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        """The pipeline's noise: drawn as one video frame (B, 1, C, h, w), then packed like FLUX.1's."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        z = randn_tensor((batch, 1, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        return pack_latents(z.view(batch, c, h, w))

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's: linspace sigmas, mu linear in the token count, then the scheduler's shifts."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        cfg = self.pipe.scheduler.config
        h, w = self.latent_hw(height, width)
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return schedule.scheduler_sigmas(cfg, num_steps, mu).to(self.device)

    # ------------------------------------------------------------------ the model
    def _transformer(self, x, t, embeds, mask, img_shapes):
        if mask is not None and bool(mask.all()):
            mask = None  # the pipeline drops an all-ones mask
        return self.transformer(hidden_states=x, timestep=t / 1000, guidance=None, encoder_hidden_states_mask=mask,
                                encoder_hidden_states=embeds, img_shapes=img_shapes, attention_kwargs={},
                                return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma, cond: Conditioning) -> torch.Tensor:
        b, n_img = x.shape[0], x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        shape = grid_layout(cond, "img_shape", n_img, lambda side: (1, side, side))
        img_shapes = [[tuple(int(s) for s in shape)]] * b
        # the pipeline feeds (sigma * 1000) in the latent dtype, / 1000
        t = (sigma * self.pipe.scheduler.config.num_train_timesteps).expand(b).to(x.dtype)
        v = self._transformer(x, t, cond.batch["embeds"], cond.batch["mask"], img_shapes)
        if self.do_cfg:  # two passes like the pipeline: the two text lengths differ
            with torch.no_grad() if self.split_uncond else contextlib.nullcontext():
                neg = self._transformer(x.detach() if self.split_uncond else x, t, cond.shared["neg_embeds"].expand(b, -1, -1), None, img_shapes)
            comb = neg + self.guidance_scale * (v - neg)
            v = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return v

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents_mean and 1 / latents_std as (1, C, 1, 1, 1) tensors, computed like the pipeline."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def to_latent_image(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens -> the VAE's latent video of one frame (B, C, 1, h, w), de-normalised."""
        z = unpack_latents(x, *self.latent_hw(height, width))[:, :, None].to(self.vae.dtype)
        mean, inv_std = self._latent_stats(z)
        return z / inv_std + mean

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = self.to_latent_image(x, height, width)
        return (self.vae.decode(z, return_dict=False)[0][:, :, 0] / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1] -> packed, normalised tokens (the model's x at sigma = 0)."""
        dist = self.vae.encode((images * 2 - 1)[:, :, None]).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, inv_std = self._latent_stats(z)
        return pack_latents(((z - mean) * inv_std)[:, :, 0])
