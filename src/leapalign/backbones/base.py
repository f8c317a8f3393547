"""What every backbone adapter offers the rollout and the methods; nothing else knows the model family."""
from __future__ import annotations

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


class Backbone:
    """Adapter interface: prompts -> conditioning, noise, schedule, velocity(x, sigma, cond), latents -> image.

    `x` is always the latent in the layout the transformer takes (packed tokens for FLUX).
    """

    transformer: torch.nn.Module
    default_max_sequence_length = 512

    def cached_encodings(self, prompts: list[str], encode) -> list[torch.Tensor]:
        """Per-prompt text encodings stacked over `prompts`; each distinct prompt is encoded once.

        `encode(new_prompts)` returns one tuple of tensors per prompt (text encoders are frozen,
        so the cache never goes stale).
        """
        cache = self.__dict__.setdefault("_prompt_cache", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            with torch.no_grad():
                cache.update(zip(missing, encode(missing)))
        return [torch.stack(parts) for parts in zip(*(cache[p] for p in prompts))]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def at_resolution(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """The conditioning for images of this size (FLUX adds the image-token positions)."""
        return cond

    def check_resolution(self, height: int, width: int) -> None:
        raise NotImplementedError

    def initial_noise(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], differentiable in x."""
        raise NotImplementedError
