"""Typed head parameters: each head declares its knobs once, as a frozen dataclass.

A field made with :func:`param` carries its default, help text, allowed values and
bounds; :func:`parse` checks a mapping from TOML, the command line or a saved head
against it (unknown keys, wrong types, values out of range are one-line
:class:`ParamError`), :func:`record` writes it back as JSON-able values, and
:func:`describe` lists it for ``--list-params`` and the README.  Like open_clip's
``CLIPVisionCfg(**cfg)``: an unknown key fails at once instead of being carried along
unused.  No torch here: the config check stays cheap.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import Field, field, fields, replace
from typing import Any

from ..errors import InputError


class ParamError(InputError):
    """A head parameter that is unknown, of the wrong type or out of range."""


def param(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
          low: float | None = None, high: float | None = None,
          above: float | None = None, min_len: int | None = None) -> Any:
    """A parameter field: ``low <= value <= high``, ``value > above`` (numbers, and each
    element of a list of numbers), ``value in choices``, lists of ``min_len`` or more."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "above": above,
            "min_len": min_len}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata=meta)


def parse(base: Any, values: Mapping[str, Any], where: str) -> Any:
    """``base`` (a params instance: the head's defaults) with ``values`` checked and set."""
    if not isinstance(values, Mapping):
        raise ParamError(f"{where} must be a table of parameters, not {values!r}")
    known = {f.name: f for f in fields(base)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParamError(f"{where}: unknown parameter(s) {unknown}{hint}; allowed: "
                         f"{sorted(known)}")
    hints = typing.get_type_hints(type(base))
    checked = {k: _check(v, hints[k], known[k], f"{where} {k}") for k, v in values.items()}
    return replace(base, **checked)


def record(params: Any) -> dict[str, Any]:
    """JSON-able values (tuples as lists), as a saved head keeps them."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(params, f.name)) for f in fields(params)}


def describe(params: Any) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` per parameter of a params instance."""
    hints = typing.get_type_hints(type(params))
    out = []
    for f in fields(params):
        extra = ""
        if f.metadata.get("choices"):
            extra = f" (one of {', '.join(map(str, f.metadata['choices']))})"
        out.append((f.name, _type_name(hints[f.name]), record(params)[f.name],
                    f.metadata.get("help", "") + extra))
    return out


def defaults(cls: type, **overrides: Any) -> Any:
    """An instance of params class ``cls`` with some defaults replaced (checked)."""
    return parse(cls(), overrides, cls.__name__)


# --------------------------------------------------------------------------- checking

def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "none"
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(args[0])}"
    if typing.get_origin(hint) is dict:
        return "table"
    return getattr(hint, "__name__", str(hint))


def _check(value: Any, hint: Any, f: Field, where: str) -> Any:
    value = _coerce(value, hint, where)
    meta = f.metadata
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ParamError(f"{where} must be one of {list(choices)}, not {value!r}")
    if isinstance(value, tuple) and len(value) < (meta.get("min_len") or 0):
        raise ParamError(f"{where} needs at least {meta['min_len']} value(s), not {value!r}")
    for v in (value if isinstance(value, tuple) else (value,)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if meta.get("low") is not None and v < meta["low"]:
            raise ParamError(f"{where} must be >= {meta['low']}, not {value!r}")
        if meta.get("high") is not None and v > meta["high"]:
            raise ParamError(f"{where} must be <= {meta['high']}, not {value!r}")
        if meta.get("above") is not None and v <= meta["above"]:
            raise ParamError(f"{where} must be > {meta['above']}, not {value!r}")
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as ``hint`` (int, float, bool, str, X | None, tuple[X, ...], dict), or a
    ParamError saying what was expected.  Strings from the command line are accepted for
    numbers and comma-separated lists."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # hidden = 128: one layer
        if not isinstance(value, list | tuple):
            raise ParamError(f"{where} must be a list of {_type_name(args[0])}, not {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, Mapping):
            raise ParamError(f"{where} must be a table, not {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ParamError(f"{where} must be true or false, not {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = int(value) if hint is int else float(value)
            except ValueError:
                raise ParamError(f"{where} must be {'an integer' if hint is int else 'a number'}"
                                 f", not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                hint is int and not float(value).is_integer()):
            raise ParamError(f"{where} must be {'an integer' if hint is int else 'a number'}, "
                             f"not {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(f"{where} must be a string, not {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {hint!r}")  # a declaration bug, not input
