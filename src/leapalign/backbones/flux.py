"""FLUX.1 adapter: a diffusers FluxPipeline seen as velocity(x, sigma, cond).

Latents are FLUX's packed 2x2 tokens (B, L, 4C).  Prompt encodings are cached per prompt.
Trailing text tokens whose encodings equal the last one to float rounding (the padding of an
encoder whose pad rows do not depend on position, like the ShapeWorld base's windowed T5) are
merged into one token with a log(count) attention bias: softmax over n equal keys equals one
key with logit + log n, so the velocity is unchanged while the transformer sees ~30 tokens
instead of ~530.
"""
from __future__ import annotations

import math

import torch

from .. import schedule
from .base import Backbone, Conditioning


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of h x w."""
    b, _, ch = x.shape
    return x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w)


def latent_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


MERGE_RTOL = 1e-5  # rows within this of the last (relative to its largest entry) count as equal: float32 rounding


def merge_identical_padding(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the trailing run of rows equal to the last one (to MERGE_RTOL) down to a single row.

    Returns the shortened embeddings and a log-count bias per text token (B, T), or None when
    nothing can be merged.  Exact only because FLUX gives every text token the same position id.
    The tolerance is for the encoder's own rounding: a windowed encoder computes equal pad rows
    with reductions ordered differently per position (1e-7 apart), which is not a difference.
    """
    b, t, _ = embeds.shape
    last = embeds[:, -1:]
    same = (embeds - last).abs().amax(-1) <= MERGE_RTOL * last.abs().amax(-1)  # (B, T)
    # first index of the trailing all-identical run, per sample
    run = torch.flip(torch.cumprod(torch.flip(same, [1]).int(), 1), [1]).sum(1)
    keep = int(t - run.min().item()) + 1
    if keep >= t:
        return embeds, None
    bias = torch.zeros(b, keep, dtype=embeds.dtype, device=embeds.device)
    bias[:, -1] = math.log(t - keep + 1)
    return embeds[:, :keep], bias


class FluxBackbone(Backbone):
    """FLUX.1 (dev: guidance embedding; schnell: none) through a diffusers FluxPipeline."""

    family = "FLUX"

    def __init__(self, pipe, guidance_scale: float = 3.5, max_sequence_length: int | None = None, merge_padding: bool = True):
        super().__init__(pipe, guidance_scale, max_sequence_length)
        self.merge_padding = merge_padding

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        def encode(new):
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=new, prompt_2=new, device=self.encode_device,
                                                        max_sequence_length=self.max_sequence_length)
            return list(zip(embeds, pooled))

        embeds, pooled = self.cached_encodings(prompts, encode)
        return self.conditioning(embeds, pooled)

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        """Conditioning from text-encoder outputs (differentiable: pretraining uses it)."""
        bias = None
        if self.merge_padding:
            embeds, bias = merge_identical_padding(embeds)
        batch = {"embeds": embeds, "pooled": pooled}
        if bias is not None:
            batch["text_bias"] = bias
        shared = {"txt_ids": torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)}
        return Conditioning(batch, shared)

    # ------------------------------------------------------------------ geometry and schedule
    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def at_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        h, w = self.latent_hw(height, width)
        return Conditioning(cond.batch, {**cond.shared, "img_ids": latent_image_ids(h, w).to(self.device)})

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        """The pipeline's starting noise for the same generator: drawn unpacked, then packed."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        z = randn_tensor((batch, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        return pack_latents(z)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        cfg = self.pipe.scheduler.config
        h, w = self.latent_hw(height, width)
        seq_len = (h // 2) * (w // 2)
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            mu = schedule.dynamic_shift_mu(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return schedule.scheduler_sigmas(cfg, num_steps, mu).to(self.device)

    # ------------------------------------------------------------------ the model
    def velocity(self, x: torch.Tensor, sigma, cond: Conditioning) -> torch.Tensor:
        b, n_img = x.shape[0], x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        # the pipeline feeds (sigma * 1000) / 1000 in the latent dtype; keep the same rounding
        timestep = ((sigma * 1000).expand(b).to(x.dtype)) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            # a float, or one value per sample (guidance distillation trains on a range)
            guidance = torch.as_tensor(self.guidance_scale, device=x.device, dtype=torch.float32).expand(b)
        img_ids = cond.shared.get("img_ids")
        if img_ids is None:  # no resolution given: only a square token grid is unambiguous
            side = int(round(math.sqrt(n_img)))
            if side * side != n_img:
                raise ValueError(f"{n_img} image tokens are not a square grid; call backbone.at_resolution(cond, height, width) first")
            img_ids = latent_image_ids(2 * side, 2 * side)
        img_ids = img_ids.to(device=x.device, dtype=x.dtype)
        kwargs = None
        if "text_bias" in cond.batch:
            bias = cond.batch["text_bias"].to(x.dtype)
            bias = torch.cat([bias, bias.new_zeros(b, n_img)], 1)[:, None, None, :]
            kwargs = {"attention_mask": bias}
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.batch["pooled"],
            encoder_hidden_states=cond.batch["embeds"],
            txt_ids=cond.shared["txt_ids"],
            img_ids=img_ids,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]

    def to_latent_image(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self.latent_hw(height, width)
        z = unpack_latents(x, h, w)
        return z / self.vae.config.scaling_factor + self.vae.config.shift_factor

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = self.to_latent_image(x, height, width).to(self.vae.dtype)
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1] -> packed, normalised latents (the model's x at sigma = 0)."""
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return pack_latents(z)
