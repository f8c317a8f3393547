"""Backbone adapters, chosen from the pipeline class named in the model folder's model_index.json."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .base import TEXT_ENCODERS, Backbone, Conditioning
from .flux import FluxBackbone
from .flux2 import Flux2KleinBackbone
from .qwenimage import QwenImageBackbone
from .sd3 import SD3Backbone

ADAPTERS = {
    "FluxPipeline": FluxBackbone,  # FLUX.1 dev / schnell
    "Flux2Pipeline": Flux2KleinBackbone,  # FLUX.2 dev (guidance embedding)
    "Flux2KleinPipeline": Flux2KleinBackbone,  # FLUX.2 klein (real CFG unless step-distilled)
    "StableDiffusion3Pipeline": SD3Backbone,  # SD3 / SD3.5
    "QwenImagePipeline": QwenImageBackbone,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# model.path aliases -> a function returning the folder; plug-ins add theirs (the embedded ShapeWorld: "shapeworld")
MODEL_ALIASES: dict[str, Callable[[], str]] = {}


def resolve_model_path(path: str) -> str:
    return MODEL_ALIASES[path]() if path in MODEL_ALIASES else path


def missing_components(folder: Path) -> list[str]:
    """Components that model_index.json lists but the folder lacks (no folder, no config, or no weights)."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
        elif "tokenizer" in name or "scheduler" in name or "processor" in name:
            continue  # configs and vocabularies only
        elif not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        elif not any(f.name.endswith(WEIGHT_SUFFIXES) for f in sub.iterdir()):
            missing.append(f"{name}/ weights (*.safetensors)")
    return missing


def _pipeline_class(path: str) -> str | None:
    """The pipeline class named by a local folder (checked for completeness), or None for a hub id."""
    local = Path(path)
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"{local} is not a diffusers pipeline folder (no model_index.json); point model.path at one")
        missing = missing_components(local)
        if missing:
            raise UserError(f"model folder {local} is incomplete: missing {', '.join(missing)}; download the whole "
                            f"pipeline (e.g. `hf download <repo id> --local-dir {local}`)")
        return json.loads((local / "model_index.json").read_text()).get("_class_name")
    if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        return None  # a hub id: diffusers resolves it (HF_HUB_OFFLINE=1 means: from the local cache only)
    raise UserError(f"model folder {path} does not exist; set model.path to a diffusers folder or hub id")


def _check_supported(cls_name: str | None) -> None:
    if cls_name is not None and cls_name not in ADAPTERS:
        raise UserError(f"{cls_name} is not supported yet; supported pipelines: {', '.join(ADAPTERS)}")


def check_model_path(path: str) -> None:
    """Fail early, with one line, on a model folder that cannot be loaded (no model loading done here)."""
    _check_supported(_pipeline_class(resolve_model_path(path)))


def adapter_options(adapter, model_cfg) -> dict:
    """The model.* settings this adapter takes; None means the adapter's own default."""
    accepted = inspect.signature(adapter).parameters
    options = {"guidance_scale": model_cfg.guidance_scale, "max_sequence_length": model_cfg.max_sequence_length,
               "negative_prompt": model_cfg.negative_prompt, "detach_uncond": model_cfg.detach_uncond}
    return {k: v for k, v in options.items() if k in accepted and v is not None}


def set_attention_backend(backbone: Backbone, name: str) -> None:
    """Route the transformer's attention through one of diffusers' kernels (rollout, training and evaluation alike).

    The padding merge of FLUX adapters is switched off: it needs an attention mask, which kernels
    like flash attention do not take (a pipeline whose padding merges, the ShapeWorld base's, then
    sees all its text tokens)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if name not in names:
        raise UserError(f"model.attention_backend {name!r} is not one of diffusers' attention backends: {', '.join(names)}")
    if not hasattr(backbone.transformer, "set_attention_backend"):
        raise UserError(f"model.attention_backend: this diffusers version cannot switch {type(backbone.transformer).__name__}'s attention")
    try:
        backbone.transformer.set_attention_backend(name)
    except (RuntimeError, ImportError, ValueError) as e:
        raise UserError(f"model.attention_backend={name} cannot be used here: {str(e).splitlines()[0]}") from None
    if hasattr(backbone, "merge_padding"):
        backbone.merge_padding = False


def load_backbone(model_cfg, device: torch.device | str = "cpu") -> Backbone:
    """Load the diffusers pipeline at model.path and wrap it in the adapter of its class."""
    path = resolve_model_path(model_cfg.path)
    if model_cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {model_cfg.dtype!r}")
    check_model_path(path)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[model_cfg.dtype])
    except (OSError, ValueError, EnvironmentError) as e:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"could not load the pipeline at {path}{offline}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    cls_name = type(pipe).__name__
    _check_supported(cls_name)
    pipe.to(device)
    for name in ("vae", *TEXT_ENCODERS):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    adapter = ADAPTERS[cls_name]
    backbone = adapter(pipe, **adapter_options(adapter, model_cfg))
    if model_cfg.attention_backend:
        set_attention_backend(backbone, model_cfg.attention_backend)
    try:
        backbone.check_resolution(model_cfg.height, model_cfg.width)
    except ValueError as e:
        raise UserError(f"model.height/width: {e}") from None
    return backbone


__all__ = ["ADAPTERS", "Backbone", "Conditioning", "Flux2KleinBackbone", "FluxBackbone", "QwenImageBackbone", "SD3Backbone", "load_backbone"]
