"""One registry pattern for every named choice: merge methods, adaptation methods, label-free scores, architectures.

An entry is a name, a typed options dataclass (its fields and defaults are the options a
user may set), a one-line summary, and the implementation as a ``"module:attribute"``
string imported on first use. Entries are declared where their options are, by a
decorator on the options dataclass, in modules that import no torch: so the command line's
help, the run config's checks and the experiment config's checks read the registry itself,
never a copy of its names, and still answer at once. Where the implementation may be
imported anyway (the experiments' strategies), ``implements`` decorates the function itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.options.typed import OptionError, build_options, closest

__all__ = ["Entry", "NoOptions", "Registry"]


@dataclass(frozen=True)
class NoOptions:
    """For an entry without options of its own."""


@dataclass(frozen=True)
class Entry:
    """One registered name: its options type, its summary, and where its implementation lives."""

    kind: str
    name: str
    options: type
    summary: str
    target: str  # "package.module:attribute"
    defaults: Mapping[str, Any] = field(default_factory=dict)  # options this name fixes (e.g. a model's width)

    def make_options(self, raw: Mapping[str, Any] | None = None, aliases: Mapping[str, str] | None = None) -> Any:
        """The typed options from kebab- or snake-case ``raw`` over this entry's defaults; bad ones refused by name."""
        return build_options(self.options, {**self.defaults, **dict(raw or {})}, f"{self.kind} {self.name!r}", aliases)

    def load(self) -> Any:
        """The implementation (imports its module the first time)."""
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def option_help(self) -> str:
        """``"k=0.2 lam=1.0"``: every option with the default this entry gives it."""
        try:
            options = self.make_options()
        except OptionError:  # an option without a default: list the names only
            return " ".join(self.options.__dataclass_fields__)
        return " ".join(f"{k.replace('_', '-')}={v}" for k, v in vars(options).items())


class Registry:
    """Names of one kind of thing, each with typed options and a lazily imported implementation."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, target: str, summary: str = "", defaults: Mapping[str, Any] | None = None
    ) -> Callable[[type], type]:
        """Decorate an options dataclass: ``name`` takes these options and is implemented by ``target``."""

        def wrap(options: type) -> type:
            self.add(name, target=target, summary=summary, options=options, defaults=defaults)
            return options

        return wrap

    def implements(
        self, name: str, *, options: type = NoOptions, summary: str = ""
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a module-level function: ``name`` is implemented by it and takes ``options``."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, target=f"{fn.__module__}:{fn.__qualname__}", summary=summary, options=options)
            return fn

        return wrap

    def add(
        self,
        name: str,
        *,
        target: str,
        summary: str = "",
        options: type = NoOptions,
        defaults: Mapping[str, Any] | None = None,
    ) -> Entry:
        """Register ``name`` directly (an entry whose options are shared, or that has none)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attribute', not {target!r}")
        entry = Entry(self.kind, name, options, summary, target, dict(defaults or {}))
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (an entry registered for a while, e.g. by a test or a plugin being unloaded)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> Entry:
        """The entry, or one error naming the closest known name and every name."""
        if name not in self._entries:
            raise OptionError(
                f"unknown {self.kind} {name!r}{closest(name, self._entries)}; choose one of {', '.join(self._entries)}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self) -> str:
        """One line per entry: name, summary, options with their defaults."""
        width = max((len(n) for n in self._entries), default=0)
        lines = []
        for entry in self._entries.values():
            options = entry.option_help()
            lines.append(f"  {entry.name:<{width}}  {entry.summary}" + (f" [{options}]" if options else ""))
        return "\n".join(lines)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
