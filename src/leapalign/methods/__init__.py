"""Method registry: `method.name` -> the class that builds its surrogates. Adding a method = one module + one line."""
from __future__ import annotations

import dataclasses
import difflib
import typing

from ..errors import UserError
from ..values import coerce
from .base import Method, Surrogate
from .alignprop import AlignProp
from .draft import DraftK, DraftLV
from .drtune import DRTune
from .flowbp import FlowBPSparse
from .leapalign import LeapAlign
from .refl import ReFL

REGISTRY: dict[str, type[Method]] = {
    "leapalign": LeapAlign,
    "refl": ReFL,
    "draft_k": DraftK,
    "draft_lv": DraftLV,
    "drtune": DRTune,
    "alignprop": AlignProp,
    "flowbp_sparse": FlowBPSparse,
}


def build_method(options: dict, typed_options: bool = False):
    """A method from `{"name": ..., **its options}`, with unknown names, keys and bad values rejected.

    With `typed_options`, return all its options, defaults included, in the fields' types instead (for the config)."""
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
    hints = typing.get_type_hints(cls)
    options = {k: coerce(v, hints[k], f"method.{k}") for k, v in options.items()}
    try:
        method = cls(**options)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if typed_options:  # every option, resolved, in plain YAML types: config.yaml says exactly what ran
        values = {f: getattr(method, f) for f in fields if fields[f].init}
        return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}
    return method


__all__ = ["REGISTRY", "Method", "Surrogate", "build_method"]
