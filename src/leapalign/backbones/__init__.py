"""Backbone adapters, chosen from the pipeline class named in the model folder's model_index.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .base import Backbone, Conditioning
from .flux import FluxBackbone

ADAPTERS = {"FluxPipeline": FluxBackbone}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    if path == "shapeworld":
        from ..shapeworld import BASE_DIR, _require

        return str(_require(BASE_DIR, "the ShapeWorld base pipeline"))
    return path


def load_backbone(model_cfg, device: torch.device | str = "cpu") -> Backbone:
    """Load the diffusers pipeline at model.path and wrap it in the adapter of its class."""
    path = resolve_model_path(model_cfg.path)
    if model_cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {model_cfg.dtype!r}")
    local = Path(path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(f"{local} is not a diffusers pipeline folder (no model_index.json); point model.path at one")
        cls_name = json.loads(index.read_text()).get("_class_name")
    elif "/" in path and not path.startswith((".", "/")):
        cls_name = None  # a hub id: let diffusers resolve it
    else:
        raise UserError(f"model folder {path} does not exist; set model.path to a diffusers folder or hub id")
    if cls_name is not None and cls_name not in ADAPTERS:
        raise UserError(f"{cls_name} is not supported yet; supported pipelines: {', '.join(ADAPTERS)}")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=DTYPES[model_cfg.dtype])
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline at {path}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    cls_name = type(pipe).__name__
    if cls_name not in ADAPTERS:
        raise UserError(f"{cls_name} is not supported yet; supported pipelines: {', '.join(ADAPTERS)}")
    pipe.to(device)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    backbone = ADAPTERS[cls_name](pipe, guidance_scale=model_cfg.guidance_scale, max_sequence_length=model_cfg.max_sequence_length)
    try:
        backbone.check_resolution(model_cfg.height, model_cfg.width)
    except ValueError as e:
        raise UserError(f"model.height/width: {e}") from None
    return backbone


__all__ = ["ADAPTERS", "Backbone", "Conditioning", "FluxBackbone", "load_backbone"]
