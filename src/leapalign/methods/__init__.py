"""Method registry: `method.name` -> the class that builds its surrogates. Adding a method = one module + one line."""
from __future__ import annotations

import dataclasses
import difflib

from ..errors import UserError
from .base import Method, Surrogate
from .leapalign import LeapAlign

REGISTRY: dict[str, type[Method]] = {
    "leapalign": LeapAlign,
}


def build_method(options: dict) -> Method:
    """A method from `{"name": ..., **its options}`, with unknown names, keys and bad values rejected."""
    options = dict(options)
    name = options.pop("name", None)
    if name not in REGISTRY:
        hint = difflib.get_close_matches(str(name), list(REGISTRY), n=1, cutoff=0.0)
        raise UserError(f"unknown method.name {name!r}; choose one of {', '.join(REGISTRY)}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.0)
            raise UserError(f"unknown config key 'method.{key}' for method {name}" + (f"; did you mean 'method.{hint[0]}'?" if hint else ""))
    for key in ("window",):
        if key in options and options[key] is not None:
            options[key] = tuple(float(v) for v in options[key])
    try:
        return cls(**options)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


__all__ = ["REGISTRY", "Method", "Surrogate", "build_method"]
