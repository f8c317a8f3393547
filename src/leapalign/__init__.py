"""leapalign: reward-gradient post-training of flow-matching text-to-image models."""

__version__ = "0.1.0"

# The embedded world registers its model alias, rewards, prompt sets and judge like any plug-in would.
from .shapeworld.plugin import register as _register_shapeworld  # noqa: E402

_register_shapeworld()
