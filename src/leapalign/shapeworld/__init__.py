"""ShapeWorld, the embedded world: prompts, renders, the base FLUX pipeline, the ShapeScore reward, ShapeEval.

    from leapalign import shapeworld
    pipe = shapeworld.load_pipeline()
    reward = shapeworld.load_reward()
    shapeworld.evaluate(images, prompts)   # {"overall": ..., "single_object": ..., ...}
    shapeworld.prompts("eval")
"""
from __future__ import annotations

from pathlib import Path

from .shapeeval import evaluate
from .world import TAGS, parse, prompt_rows, prompts, render, render_batch

ASSETS = Path(__file__).parent / "assets"
BASE_DIR = ASSETS / "base"
SHAPESCORE_DIR = ASSETS / "shapescore"
DEMO_CONFIG = Path(__file__).parent / "demo.yaml"  # its tuned settings: `leapalign demo`, configs/shapeworld_leapalign.yaml


def _require(path: Path, what: str) -> Path:
    from ..errors import UserError

    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(f"{what} is missing at {path}; rebuild it with `python -m leapalign.shapeworld.pretrain` (see docs/shapeworld.md)")
    return path


def load_pipeline(path: str | Path | None = None, dtype=None):
    """The shipped ShapeWorld base as a diffusers FluxPipeline (offline)."""
    import torch
    from diffusers import FluxPipeline

    p = _require(Path(path) if path else BASE_DIR, "the ShapeWorld base pipeline")
    pipe = FluxPipeline.from_pretrained(p, dtype=dtype or torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_reward(path: str | Path | None = None):
    """ShapeScore: reward(images in [0,1] (B,3,32,32), prompts) -> (B,) cosine similarity, differentiable."""
    from ..rewards.clip import ClipReward

    return ClipReward.from_pretrained(_require(Path(path) if path else SHAPESCORE_DIR, "the ShapeScore reward model"))


__all__ = ["TAGS", "evaluate", "load_pipeline", "load_reward", "parse", "prompt_rows", "prompts", "render", "render_batch"]
