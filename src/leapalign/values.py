"""YAML values checked against a field's annotated type (config sections and method options share it)."""
from __future__ import annotations

import types
import typing

import yaml

from .errors import UserError


def coerce(value, tp, where: str):
    """Check/convert a YAML value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return coerce(value, option, where)
            except UserError:
                pass
        return coerce(value, inner[-1], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or value is None:
            raise UserError(f"{where} must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
        if tp is int and float(value) != out:
            raise UserError(f"{where} must be a whole number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [parse_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where} must have {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, where) for v, a in zip(value, args))
        return [coerce(v, args[0], where) for v in value] if args else list(value)
    return value


def parse_scalar(text: str):
    return yaml.safe_load(text) if text != "" else ""
