"""What every backbone adapter offers the rollout and the methods; nothing else knows the model family."""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """The transformer's inputs for a batch of prompts, computed once and cached.

    `batch` tensors have the batch as their first dimension; `shared` ones do not.
    """

    batch: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.batch.values())).shape[0]

    def index(self, idx) -> "Conditioning":
        """The conditioning of a sub-batch (a slice, a list or a tensor of indices)."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return Conditioning({k: v[idx] for k, v in self.batch.items()}, self.shared)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning({k: torch.cat([p.batch[k] for p in parts]) for k in parts[0].batch}, parts[0].shared)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the pipeline slots that can hold one


class Backbone:
    """Adapter interface: prompts -> conditioning, noise, schedule, velocity(x, sigma, cond), latents -> image.

    `x` is always the latent in the layout the transformer takes (packed tokens for FLUX).
    """

    transformer: torch.nn.Module
    default_max_sequence_length = 512
    family = "diffusers"  # the model family, as error messages name it

    # real CFG only: in a step that carries gradient, the unconditional branch runs apart and without gradient
    # (half the activation memory); the rollout keeps the pipeline's one doubled batch.  model.detach_uncond.
    detach_uncond = False
    do_cfg = False  # real classifier-free guidance (an adapter with CFG says when, as its pipeline does)

    @property
    def split_uncond(self) -> bool:
        return self.do_cfg and self.detach_uncond and torch.is_grad_enabled()

    def __init__(self, pipe, guidance_scale: float, max_sequence_length: int | None = None):
        """The parts every adapter keeps; the text encoders and the VAE stay frozen in `pipe`."""
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.vae_scale_factor = pipe.vae_scale_factor
        self._prompt_cache: dict[str, tuple] = {}
        self.text_device: torch.device | None = None  # where the text encoders run; None = with the transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def cached_encodings(self, prompts: list[str], encode, stack: bool = True) -> list:
        """Per-prompt text encodings over `prompts`, stacked (or, with stack=False, as lists); each
        distinct prompt is encoded once.

        `encode(new_prompts)` returns one tuple of tensors per prompt (text encoders are frozen,
        so the cache never goes stale).  Each new prompt is encoded on its own: a batch's size changes the
        last bits of a matmul, and a resumed run meets its prompts in other batches than the first run did.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        with torch.no_grad():
            for p in missing:
                self._prompt_cache[p] = encode([p])[0]
        parts = zip(*(self._prompt_cache[p] for p in prompts))
        out = [torch.stack(part) if stack else list(part) for part in parts]
        if self.text_device is None:
            return out
        return [t.to(self.device) if stack else [r.to(self.device) for r in t] for t in out]

    @property
    def encode_device(self) -> torch.device:
        """Where `encode_prompt` runs and the cache lives."""
        return self.text_device or self.device

    def offload_text(self) -> None:
        """train.text_cache=cpu: text encoders and prompt cache in CPU memory, each batch moved to the device.

        The encoders are frozen, so only their outputs matter: FLUX.1's T5-XXL (about 9.5 GB in bf16)
        leaves the accelerator, and the cache (4 MB per prompt at 512 tokens) no longer grows there.
        A prompt seen for the first time is encoded on the CPU, which is slower.
        """
        for name in TEXT_ENCODERS:
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to("cpu")
        self.text_device = torch.device("cpu")
        self._prompt_cache = {p: tuple(t.cpu() for t in row) for p, row in self._prompt_cache.items()}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def at_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """The conditioning for images of this size (FLUX adds the image-token positions)."""
        return cond

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's downsampling times the transformer's 2x2 patches."""
        return self.vae_scale_factor * 2

    def check_resolution(self, height: int, width: int) -> None:
        f = self.resolution_multiple
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"resolution {height}x{width} is not a multiple of {f}, which this {self.family} model needs; "
                             f"use e.g. {max(f, height // f * f)}x{max(f, width // f * f)}")

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], differentiable in x."""
        raise NotImplementedError


def grid_layout(cond: "Conditioning", key: str, n_tokens: int, from_side):
    """The image-token layout `at_resolution` stored under cond.shared[key], else `from_side(side)` of a square grid."""
    layout = cond.shared.get(key)
    return layout if layout is not None else from_side(square_side(n_tokens))


def square_side(n_tokens: int) -> int:
    """The side of a square token grid: without a resolution (at_resolution) only a square grid is unambiguous."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} image tokens are not a square grid; call backbone.at_resolution(cond, height, width) first")
    return side
