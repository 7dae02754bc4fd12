"""What a run leaves in its ``out-dir``: the merged model, the report, and optionally each update.

File names are fixed here and never built from what a site says: a saved update is
named by its node id, the site's reported label (already reduced to
``[A-Za-z0-9._-]``, at most 64 characters) only following it.
"""

from __future__ import annotations

from pathlib import Path

from common.bn.bank import BNBank
from common.config.run import RunConfig
from common.merge.engine import MergeEngine
from common.updates.files import save_site_update
from common.updates.site import SiteUpdate, site_label

__all__ = ["MERGED_FILE", "PARTIAL_FILE", "REPORT_FILE", "UPDATES_DIR", "save_merged", "save_update", "update_path"]

MERGED_FILE = "merged.safetensors"
PARTIAL_FILE = "partial-merged.safetensors"
REPORT_FILE = "report.json"
UPDATES_DIR = "updates"


def save_merged(engine: MergeEngine, path: Path, run: RunConfig, bank: BNBank | None = None) -> Path:
    """The merged model as a ``checkpoint/1`` file, written straight from the engine's sums (and a BN bank)."""
    return engine.save(path, run.arch, run.num_classes, bank=bank)


def update_path(out_dir: Path, node_id: int, site: str) -> Path:
    """``updates/node-<id>-<label>.safetensors``: unique per node, always inside ``out_dir``."""
    return out_dir / UPDATES_DIR / f"node-{int(node_id)}-{site_label(site)}.safetensors"


def save_update(out_dir: Path, node_id: int, update: SiteUpdate, run: RunConfig) -> Path:
    return save_site_update(update_path(out_dir, node_id, update.site), update, run.arch, run.num_classes)
