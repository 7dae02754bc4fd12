"""Typed options from loose text: one reader for every "name=value" a user can type.

Adaptation methods, merge methods, experiment strategies and the run config all take
options from a command line or a TOML file. Reading them in one place means one rule
everywhere: kebab- or snake-case names, an unknown name refused with the closest known
one, and values converted to the declared type or refused (``"False"`` is not true).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OptionError", "build_options", "closest", "coerce", "parse_key_values"]


class OptionError(ValueError):
    """An option that cannot be used: an unknown name or a value of the wrong type."""


def closest(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the nearest known name, or ``""`` when none is near."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise OptionError(f"{what} must be true or false, not {value!r}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise OptionError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise OptionError(f"{what} must be an integer, not {value!r}")


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise OptionError(f"{what} must be a number, not {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(out):
        raise OptionError(f"{what} must be a finite number, not {value!r}")
    return out


def coerce(value: Any, target: type, what: str) -> Any:
    """``value`` as ``target`` (bool, int, float or str), or :class:`OptionError` naming ``what``."""
    if target is bool:
        return _bool(value, what)
    if target is int:
        return _int(value, what)
    if target is float:
        return _float(value, what)
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise OptionError(f"{what} must be a string, not {value!r}")
    return value


def _plain(hint: Any) -> Any:
    """``X | None`` -> ``X``: an optional option is set with a value of its type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def build_options(cls: type, raw: Mapping[str, Any], owner: str, aliases: Mapping[str, str] | None = None) -> Any:
    """An instance of the dataclass ``cls`` from kebab- or snake-case ``raw``; every value checked.

    ``owner`` names what the options belong to in messages (``"merge method 'ties'"``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = (aliases or {}).get(key, key.replace("-", "_"))
        if name not in fields:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields)) or "none"
            hint = closest(name.replace("_", "-"), [f.replace("_", "-") for f in fields])
            raise OptionError(f"{owner} has no option {key!r}{hint}; options: {known}")
        kwargs[name] = coerce(value, _plain(hints[name]), f"{owner} option {key!r}")
    try:
        return cls(**kwargs)
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{owner}: {exc}") from None


def parse_key_values(text: str, what: str) -> dict[str, str]:
    """``"steps=200 lr=1e-4"`` (spaces or commas between items) to a dict of strings."""
    options: dict[str, str] = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"{what} item {item!r} is not key=value")
        if key in options:
            raise OptionError(f"{what} sets {key!r} twice")
        options[key] = value
    return options
