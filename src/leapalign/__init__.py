"""leapalign: reward-gradient post-training of flow-matching text-to-image models."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes >= 0.50 (imported by diffusers / peft when installed) tries to fetch a CPU kernel from the hub at import
# and logs a warning when it cannot (no network, an unverified repository); it is a speed-up we never use.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# The embedded world registers its model alias, rewards, prompt sets and judge like any plug-in would.
from .shapeworld.plugin import register as _register_shapeworld  # noqa: E402

_register_shapeworld()
