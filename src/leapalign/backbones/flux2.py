"""FLUX.2 adapter: a diffusers Flux2KleinPipeline (or Flux2Pipeline) seen as velocity(x, sigma, cond).

FLUX.2 patchifies 2x2 inside the VAE's latent space and normalises the patchified latent with
the VAE's batch-norm running statistics; the transformer then takes one token per patch
(B, L, 4C), row-major over the patch grid, with 4-axis position ids (t, h, w, l).
Klein base models use real classifier-free guidance against the empty prompt (not for the
step-distilled ones); FLUX.2-dev uses a distilled guidance embedding instead.
"""
from __future__ import annotations

import inspect

import torch

from .. import schedule
from .base import Backbone, Conditioning, grid_layout


def pack_tokens(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) patchified latent -> (B, h * w, C) tokens, row-major (the pipeline's _pack_latents)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_tokens; equals the pipeline's id-scatter for its row-major ids."""
    b, _, c = x.shape
    return x.permute(0, 2, 1).reshape(b, c, h, w)


def patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def token_ids(h: int, w: int) -> torch.Tensor:
    """Position ids (t, h, w, l) of an h x w token grid: (0, i, j, 0), row-major, int64 like the pipeline's."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))


def text_ids(n: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))


class Flux2KleinBackbone(Backbone):
    """FLUX.2 [klein] (real CFG against "", unless step-distilled) and FLUX.2 [dev] (guidance embedding)."""

    family = "FLUX.2"

    def __init__(self, pipe, guidance_scale: float = 4.0, max_sequence_length: int | None = None,
                 negative_prompt: str = "", text_encoder_out_layers: tuple[int, ...] | None = None, detach_uncond: bool = True):
        super().__init__(pipe, guidance_scale, max_sequence_length)
        self.negative_prompt = negative_prompt  # the klein pipeline always uses ""
        self.detach_uncond = detach_uncond  # the reference's FLUX.2 trainers: cfg_detach_neg true
        if text_encoder_out_layers is None:  # the pipeline's default: which hidden layers are stacked
            text_encoder_out_layers = inspect.signature(pipe.encode_prompt).parameters["text_encoder_out_layers"].default
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        # Flux2KleinPipeline registers is_distilled; Flux2Pipeline (dev) has no CFG but a guidance embedding
        self.is_klein = "is_distilled" in pipe.config
        self.embedded_guidance = not self.is_klein

    @property
    def do_cfg(self) -> bool:
        return self.is_klein and self.guidance_scale > 1 and not self.pipe.config.is_distilled  # the pipeline's rule

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]):
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.encode_device, max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return [(e,) for e in embeds]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        (embeds,) = self.cached_encodings(prompts, self._encode)
        shared = {"txt_ids": text_ids(embeds.shape[1]).to(self.device)}
        if self.do_cfg:  # one row, broadcast over the batch
            (shared["neg_embeds"],) = self.cached_encodings([self.negative_prompt], self._encode)
        return Conditioning({"embeds": embeds}, shared)

    # ------------------------------------------------------------------ geometry and schedule
    def token_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        return height // f, width // f

    def at_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        return Conditioning(cond.batch, {**cond.shared, "img_ids": token_ids(*self.token_hw(height, width)).to(self.device)})

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        """The pipeline's starting noise: drawn as (B, 4C, h/2, w/2), then flattened to tokens."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.token_hw(height, width)
        c = self.transformer.config.in_channels
        return pack_tokens(randn_tensor((batch, c, h, w), generator=generator, device=self.device, dtype=self.dtype))

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's: linspace sigmas, shifted with FLUX.2's empirical mu (token count and step count)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        h, w = self.token_hw(height, width)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)
        return schedule.scheduler_sigmas(self.pipe.scheduler.config, num_steps, mu).to(self.device)

    # ------------------------------------------------------------------ the model
    def velocity(self, x: torch.Tensor, sigma, cond: Conditioning) -> torch.Tensor:
        b, n_img = x.shape[0], x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        img_ids = grid_layout(cond, "img_ids", n_img, lambda side: token_ids(side, side).to(x.device))
        embeds = cond.batch["embeds"]
        if not self.do_cfg:
            return self._call(x, sigma, embeds, cond, img_ids)
        neg = cond.shared["neg_embeds"].expand(b, -1, -1)
        if self.split_uncond:
            v_text = self._call(x, sigma, embeds, cond, img_ids)
            with torch.no_grad():
                v_uncond = self._call(x.detach(), sigma, neg, cond, img_ids)
        else:  # cond and uncond in one doubled batch (same text length: both padded)
            v_text, v_uncond = self._call(torch.cat([x, x]), sigma, torch.cat([embeds, neg]), cond, img_ids).chunk(2)
        return v_uncond + self.guidance_scale * (v_text - v_uncond)

    def _call(self, x_in: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, cond: Conditioning, img_ids) -> torch.Tensor:
        n, n_img = x_in.shape[0], x_in.shape[1]
        # the pipeline feeds (sigma * 1000) in the latent dtype, / 1000
        t = (sigma * self.pipe.scheduler.config.num_train_timesteps).expand(n).to(x_in.dtype)
        guidance = None
        if self.embedded_guidance:
            guidance = torch.full((n,), self.guidance_scale, device=x_in.device, dtype=torch.float32)
        return self.transformer(hidden_states=x_in.to(self.transformer.dtype), timestep=t / 1000, guidance=guidance,
                                encoder_hidden_states=embeds, txt_ids=cond.shared["txt_ids"], img_ids=img_ids,
                                return_dict=False)[0][:, :n_img]

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def to_latent_image(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens -> the VAE's latent (B, C, 2h, 2w): batch-norm statistics undone, then unpatchified.

        This is what the klein pipeline returns for output_type="latent".
        """
        z = unpack_tokens(x, *self.token_hw(height, width))
        mean, std = self._bn_stats(z)
        return unpatchify(z * std + mean)

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = self.to_latent_image(x, height, width).to(self.vae.dtype)
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1] -> normalised tokens (the model's x at sigma = 0), as the pipeline encodes references."""
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = patchify(dist.sample(generator) if sample else dist.mode())
        mean, std = self._bn_stats(z)
        return pack_tokens((z - mean) / std)
