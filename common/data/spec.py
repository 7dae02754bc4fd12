"""What data to read, as one value that survives a command line, a Flower config and a log line.

``DataSpec`` is the single currency between the CLI, the experiment config, the Flower run
config and the readers: ``DataSpec.parse(text)`` and ``str(spec)`` round-trip. A run config
names each role's data (``site-data``, ``source-data``, ``eval-data``) with the same grammar,
as a ``;``-separated list of ``[NAME=]SPEC`` items (:func:`parse_spec_list`); one spec holding
``{domain}`` is a template a site fills with its own domain (:func:`fill_domain`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote

from common.data.corruptions import CORRUPTIONS, Corruption

__all__ = ["DATASET_KINDS", "SPEC_HELP", "DataSpec", "NamedSpec", "TimeSplit", "fill_domain", "parse_size",
           "parse_spec_list"]  # fmt: skip

DATASET_KINDS = ("synthetic", "camvid", "cityscapes", "gta5", "idd", "acdc", "darkzurich", "folder")
_QUERY_KEYS = ("split", "domain", "time", "size", "n", "seed", "corruption")

SPEC_HELP = f"""data spec (--data, --eval, --source, site-data): KIND[:ROOT][?KEY=VALUE&...]
  kinds: {", ".join(DATASET_KINDS)}
  keys:  split=NAME  domain=D[,D2]  time=first:N|last:0.F|frames:A-B  size=HxW  n=N  seed=K
         corruption=NAME:SEVERITY (severity 1-5; images only, labels untouched)
  corruptions: {", ".join(CORRUPTIONS)}
  e.g.   camvid:../shared/data/camvid?split=all&domain=Seq05VD&time=first:42&corruption=fog:4
  lists (run config site-data, eval-data): [NAME=]SPEC;[NAME=]SPEC;...  e.g. dusk=camvid:DIR?domain=0001TP
  a site-data spec with {{domain}} is filled with each site's node-config domain"""


@dataclass(frozen=True)
class TimeSplit:
    """The first or last part of each sequence in time order, or a window of frames.

    Neighbouring video frames are near-duplicates, so a random split leaks the test set
    into training; a time split keeps adaptation and evaluation frames apart.
    ``first:f`` and ``last:1-f`` partition a sequence exactly; ``frames:a-b`` keeps frames
    a to b - 1 (counted from 0), so folds can adapt on one window and score a later one.
    """

    part: str
    fraction: float | None = None
    count: int | None = None
    start: int | None = None  # with part "frames": the window's first frame

    def __post_init__(self) -> None:
        if self.part == "frames":
            if self.start is None or self.count is None or self.start < 0 or self.count < 1:
                raise ValueError(f"time split frames window needs 0 <= start and a count >= 1, got {self}")
            return
        if self.part not in ("first", "last"):
            raise ValueError(f"time split part must be 'first', 'last' or 'frames', not {self.part!r}")
        if (self.fraction is None) == (self.count is None):
            raise ValueError("a time split takes exactly one of a fraction or a frame count")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"time split fraction must be in (0, 1], not {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"time split count must be at least 1, not {self.count}")

    @classmethod
    def parse(cls, text: str) -> TimeSplit:
        """``first:42`` (frames) or ``last:0.3`` (a fraction: the value has a decimal point)."""
        part, sep, amount = text.strip().partition(":")
        if not sep or not amount:
            raise ValueError(f"time split {text!r}: expected first:N, last:N, first:0.F, last:0.F or frames:A-B")
        if part == "frames":
            low, dash, high = amount.partition("-")
            try:
                start, stop = int(low), int(high)
            except ValueError:
                raise ValueError(f"time split {text!r}: expected frames:A-B with whole numbers A < B") from None
            if not dash or stop <= start:
                raise ValueError(f"time split {text!r}: expected frames:A-B with A < B")
            return cls("frames", count=stop - start, start=start)
        try:
            if "." in amount:
                return cls(part, fraction=float(amount))
            return cls(part, count=int(amount))
        except ValueError as exc:
            raise ValueError(f"time split {text!r}: {exc}") from None

    def __str__(self) -> str:
        if self.part == "frames":
            assert self.start is not None and self.count is not None
            return f"frames:{self.start}-{self.start + self.count}"
        return f"{self.part}:{self.fraction!r}" if self.fraction is not None else f"{self.part}:{self.count}"

    def num_frames(self, total: int) -> int:
        """How many of ``total`` frames this split keeps."""
        if self.count is not None:
            return self.count
        assert self.fraction is not None
        if self.part == "first":
            return _round_half_up(self.fraction * total)
        return total - _round_half_up((1.0 - self.fraction) * total)

    def select(self, total: int) -> range:
        """Indices (in time order) of the kept frames; a count beyond ``total`` is an error."""
        k = self.num_frames(total)
        if self.part == "frames":
            assert self.start is not None
            if self.start + k > total:
                raise ValueError(f"time split {self} asks for frames up to {self.start + k}; the sequence has {total}")
            return range(self.start, self.start + k)
        if k > total:
            raise ValueError(f"time split {self} asks for {k} frames but the sequence has {total}")
        return range(k) if self.part == "first" else range(total - k, total)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def parse_size(text: str) -> tuple[int, int]:
    """``180x240`` -> (180, 240): height first, as tensors are laid out."""
    h, sep, w = text.strip().lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise ValueError(f"size {text!r}: expected HxW with positive integers, e.g. 180x240")
    return size


@dataclass(frozen=True)
class DataSpec:
    """One dataset selection: a reader, a root, and the filters applied in a fixed order.

    Order: reader split -> ``domain`` filter -> ``time_split`` per sequence -> first
    ``num_images`` -> resize to ``size`` -> ``corruption`` of the images. For synthetic data
    ``num_images`` is the number of images generated per style and ``seed`` the generation seed.
    """

    kind: str
    root: str = ""
    split: str = "train"
    domain: str | None = None
    time_split: TimeSplit | None = None
    size: tuple[int, int] | None = None
    num_images: int | None = None
    seed: int = 0
    corruption: Corruption | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; choose one of {', '.join(DATASET_KINDS)}")
        if self.kind != "synthetic" and not self.root:
            raise ValueError(f"dataset {self.kind!r} needs a root directory (e.g. {self.kind}:/path/to/{self.kind})")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, not {self.num_images}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (height, width) with positive values, not {self.size}")
        if self.domain == "":
            object.__setattr__(self, "domain", None)
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """``kind[:root][?key=value&...]`` with keys split, domain, time, size, n, seed, corruption.

        Examples: ``synthetic?domain=fog&n=64``,
        ``camvid:/data/camvid?split=all&domain=0001TP&time=first:42&size=180x240&corruption=fog:4``.
        """
        head, _, query = text.strip().partition("?")
        kind, _, root = head.partition(":")
        fields: dict[str, object] = {"kind": kind.strip(), "root": root}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key not in _QUERY_KEYS:
                raise ValueError(f"data spec {text!r}: unknown key {key!r}; known keys: {', '.join(_QUERY_KEYS)}")
            fields.update(_query_field(key, value))
        return cls(**fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        head = self.kind + (f":{self.root}" if self.root else "")
        query = []
        if self.split != "train":
            query.append(("split", self.split))
        if self.domain is not None:
            query.append(("domain", self.domain))
        if self.time_split is not None:
            query.append(("time", str(self.time_split)))
        if self.size is not None:
            query.append(("size", f"{self.size[0]}x{self.size[1]}"))
        if self.num_images is not None:
            query.append(("n", str(self.num_images)))
        if self.seed:
            query.append(("seed", str(self.seed)))
        if self.corruption is not None:
            query.append(("corruption", str(self.corruption)))
        if not query:
            return head
        return head + "?" + "&".join(f"{k}={quote(v, safe=':/.,-_')}" for k, v in query)

    def with_(self, **changes: object) -> DataSpec:
        """A copy with some fields replaced (a readable ``dataclasses.replace``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _query_field(key: str, value: str) -> dict[str, object]:
    if key == "split":
        return {"split": value}
    if key == "domain":
        return {"domain": value or None}
    if key == "time":
        return {"time_split": TimeSplit.parse(value) if value else None}
    if key == "size":
        return {"size": parse_size(value) if value else None}
    if key == "corruption":
        return {"corruption": Corruption.parse(value) if value else None}
    try:
        number = float(value) if value else None
    except ValueError:
        number = 0.5
    if number is not None and not number.is_integer():
        raise ValueError(f"{key}={value!r}: expected an integer")
    number = None if number is None else int(number)
    if key == "n":
        return {"num_images": number}
    return {"seed": number or 0}


DOMAIN_FIELD = "{domain}"
_NAME = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$", re.S)


@dataclass(frozen=True)
class NamedSpec:
    """One item of a spec list: the name it reports under, and its data."""

    name: str
    spec: DataSpec


def _item_name(text: str) -> tuple[str, str]:
    """``("dusk", "camvid:...")`` for ``dusk=camvid:...``; ``("", text)`` when the item names nothing.

    A spec's own ``=`` signs all come after its ``?``, so a ``NAME=`` prefix is told apart by
    what precedes the first ``=``: a plain name, with no ``:`` or ``?`` in it.
    """
    match = _NAME.match(text)
    return (match.group(1), match.group(2).strip()) if match else ("", text)


def parse_spec_list(text: str, what: str) -> list[NamedSpec]:
    """``[NAME=]SPEC;[NAME=]SPEC;...``: each item named by its prefix, else by its ``domain``, else by its kind.

    Names must differ, so every report line says which data it is about; ``what`` names the
    list in errors (``"run config 'eval-data'"``).
    """
    out: list[NamedSpec] = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, body = _item_name(item)
        try:
            spec = DataSpec.parse(body)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        out.append(NamedSpec(name or spec.domain or spec.kind, spec))
    names = [n.name for n in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what}: the name {twice[0]!r} is given to two specs; name them apart with NAME=SPEC")
    return out


def fill_domain(template: str, domain: str) -> str:
    """The template with ``{domain}`` replaced: a deployment's run config names the layout, each site its domain."""
    return template.replace(DOMAIN_FIELD, domain)
