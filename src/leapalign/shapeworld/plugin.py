"""ShapeWorld as a plug-in: its model alias, rewards (with their hinge margins), prompt sets, judge and default
judges go into the same registries a user's own plug-in would fill.  No core module imports ShapeWorld;
`leapalign/__init__.py` calls `register()` once.
"""
from __future__ import annotations

from ..backbones import MODEL_ALIASES
from ..evaluation import PROMPT_SETS
from ..judges import CHECKERS, DEFAULTS
from ..rewards import BUILTIN, HINGE
from . import BASE_DIR, _require, evaluate, load_reward, world


def _shapematch(path=None):
    from .shapematch import load_shapematch  # the reward module loads on first use only

    return load_shapematch(path)


def register() -> None:
    MODEL_ALIASES["shapeworld"] = lambda: str(_require(BASE_DIR, "the ShapeWorld base pipeline"))
    BUILTIN["shapescore"] = load_reward
    BUILTIN["shapematch"] = _shapematch
    HINGE["shapematch"] = (1.0, 1.0)  # its maximum (every term satisfied)
    HINGE["shapescore"] = (1.0, 1.0)  # a probability-like score in [0, 1]
    PROMPT_SETS["shapeworld"] = world.prompt_rows
    CHECKERS["shapeeval"] = lambda: evaluate
    DEFAULTS["shapeworld:"] = ["shapeeval", "shapescore"]
