"""The experiment configs that ship with fedmerge, by name: a lookup that imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).parent / "configs"

__all__ = ["CONFIGS_DIR", "list_configs", "resolve_config_path"]


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path as given, or a shipped config's name (``experiments/configs/NAME.toml``)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"experiment config not found: {path}")
        return path
    shipped = CONFIGS_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ValueError(f"unknown experiment {name_or_path!r}; shipped configs: {', '.join(list_configs())}")
    return shipped
