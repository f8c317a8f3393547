"""SD3 / SD3.5 adapter: a diffusers StableDiffusion3Pipeline seen as velocity(x, sigma, cond).

SD3 uses real classifier-free guidance: with guidance_scale > 1 every velocity, in the rollout
and in every step that carries gradient, is v_uncond + s (v_cond - v_uncond) from one doubled
transformer batch, exactly as the pipeline computes it; with `detach_uncond` a step that carries
gradient runs v_uncond apart, without gradient.  Latents keep the VAE's (B, C, h, w)
layout; the transformer patchifies them itself.
"""
from __future__ import annotations

import copy

import torch

from .. import schedule
from .base import Backbone, Conditioning


class SD3Backbone(Backbone):
    """Stable Diffusion 3 / 3.5 (three text encoders, real CFG) through StableDiffusion3Pipeline."""

    default_max_sequence_length = 256  # the pipeline's default
    family = "SD3"

    def __init__(self, pipe, guidance_scale: float = 7.0, max_sequence_length: int | None = None, negative_prompt: str = "",
                 detach_uncond: bool = False):
        super().__init__(pipe, guidance_scale, max_sequence_length)
        self.negative_prompt = negative_prompt
        self.detach_uncond = detach_uncond  # the reference's LeapAlign SD3.5 config keeps the gradient (cfg_detach_neg: false)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1  # the pipeline's rule

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, do_classifier_free_guidance=False,
            device=self.encode_device, max_sequence_length=self.max_sequence_length)
        return list(zip(embeds, pooled))

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled = self.cached_encodings(prompts, self._encode)
        shared = {}
        if self.do_cfg:  # the negative prompt's encoding, one row broadcast over the batch
            neg_embeds, neg_pooled = self.cached_encodings([self.negative_prompt], self._encode)
            shared = {"neg_embeds": neg_embeds, "neg_pooled": neg_pooled}
        return Conditioning({"embeds": embeds, "pooled": pooled}, shared)

    # ------------------------------------------------------------------ geometry and schedule
    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c = self.transformer.config.in_channels
        shape = (batch, c, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's schedule: its scheduler's default timesteps (static shift, or mu from the token count)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        cfg = scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            p = self.transformer.config.patch_size
            seq_len = (height // self.vae_scale_factor // p) * (width // self.vae_scale_factor // p)
            mu = schedule.dynamic_shift_mu(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        return scheduler.sigmas.to(device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ the model
    def _call(self, x_in: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        timestep = (sigma * 1000).expand(x_in.shape[0])  # the scheduler's timesteps, float32
        return self.transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma, cond: Conditioning) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        embeds, pooled = cond.batch["embeds"], cond.batch["pooled"]
        if not self.do_cfg:
            return self._call(x, sigma, embeds, pooled)
        neg_e = cond.shared["neg_embeds"].expand(b, -1, -1)
        neg_p = cond.shared["neg_pooled"].expand(b, -1)
        if self.split_uncond:
            v_text = self._call(x, sigma, embeds, pooled)
            with torch.no_grad():
                v_uncond = self._call(x.detach(), sigma, neg_e, neg_p)
        else:
            v_uncond, v_text = self._call(torch.cat([x, x]), sigma, torch.cat([neg_e, embeds]), torch.cat([neg_p, pooled])).chunk(2)
        return v_uncond + self.guidance_scale * (v_text - v_uncond)

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = (x / self.vae.config.scaling_factor + self.vae.config.shift_factor).to(self.vae.dtype)
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
