"""The shipped GPU recipes: written as the papers train, and runnable end to end on tiny trees of the same layouts.

``cityscapes-idd-hrda-daformer`` and ``cityscapes-idd-hrda-deeplabv2`` need the datasets and
a GPU. Here each is read against a tiny built GTA5 + Cityscapes + IDD tree (the readers'
real layouts, label encodings and file names) and a start of its real architecture, and
then run through the comparison's own pieces with the steps and sizes cut down and the
device set to the CPU: the recipe's keys, its hrda options (the crop, the feature distance
on the thing classes) and its data specs all take part.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clients.adaptation.hrda import random_crop
from common.data import build_dataset, dataset_classes
from common.device.spec import Compute
from common.models.checkpoints import save_checkpoint
from common.models.factory import build_model
from experiments.config import CONFIGS_DIR, ExperimentConfig
from experiments.pool import ModelPool, load_source
from experiments.tasks import TaskPool

RECIPES = {"cityscapes-idd-hrda-daformer": "daformer_b5", "cityscapes-idd-hrda-deeplabv2": "deeplabv2_resnet101"}
H, W = 64, 64  # every tiny frame, and the recipe's training window shrunk (an hrda_ MiT needs >= 58 a side)
CITYSCAPES_IDS = (7, 8, 11, 21, 23, 24, 26)  # road, sidewalk, building, vegetation, sky, person, car
IDD_LEVEL3_IDS = (0, 2, 20, 22, 24, 25, 12)  # road, sidewalk, car, building, vegetation, sky, a void class


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _label(ids: tuple[int, ...], seed: int) -> np.ndarray:
    """Vertical bands of the given ids in a shuffled order: every class covers a few hundred pixels."""
    order = np.random.default_rng(seed).permutation(len(ids))
    band = math.ceil(W / len(ids))
    return np.array([ids[order[c // band]] for c in range(W)], dtype=np.uint8)[None, :].repeat(H, 0)


def _png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:  # GTA5 labels are palette images whose indices are the Cityscapes ids
        image = image.convert("P")
        image.putdata(array.ravel().tolist())
    image.save(path)


def _tree(root: Path, arch: str, checkpoint: str) -> None:
    """GTA5, Cityscapes and IDD as their readers expect them, and the recipe's start, all tiny."""
    for i in range(4):
        _png(root / "gta5/images" / f"{i:05d}.png", _frame(i))
        _png(root / "gta5/labels" / f"{i:05d}.png", _label(CITYSCAPES_IDS, i), palette=True)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            stem = f"aachen_000000_{i:06d}"
            _png(root / "cityscapes/leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", _frame(10 + i))
            _png(root / "cityscapes/gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png",
                 _label(CITYSCAPES_IDS, 10 + i))  # fmt: skip
            _png(root / "idd/leftImg8bit" / split / "201" / f"frame{i:04d}_leftImg8bit.png", _frame(20 + i))
            _png(root / "idd/gtFine" / split / "201" / f"frame{i:04d}_gtFine_labellevel3Ids.png",
                 _label(IDD_LEVEL3_IDS, 20 + i))  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(build_model(arch, 19), root / "checkpoints" / checkpoint, arch, dataset_classes("cityscapes"))


def _load(name: str, root: Path) -> ExperimentConfig:
    return ExperimentConfig.load(CONFIGS_DIR / f"{name}.toml", data_root=str(root))


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_recipe_is_hrda_at_the_papers_resolution_and_schedule_on_a_gpu(name):
    config = _load(name, Path("/nonexistent/data"))
    assert config.compute == Compute("cuda", "bf16")
    options = config.method.options
    assert (config.method.name, options["steps"], options["batch-size"], options["lr"]) == ("hrda", 40000, 2, 6e-5)
    assert (options["warmup"], options["head-lr-mult"], options["crop"]) == (1500, 10.0, "1024x1024")
    assert options["fd-classes"] == "6,7,11,12,13,14,15,16,17,18" and config.method.backbone_weights
    assert config.source.wrap == "hrda" and config.method.source.size == (1440, 2560)
    sizes = {s.name: s.data.size for s in config.sites} | {e.domain: e.data.size for e in config.eval_sets}
    assert sizes == {"cityscapes": (1024, 2048), "idd": (1024, 2048)}  # one size: data-combination batches both
    assert "ESTIMATE" in (CONFIGS_DIR / f"{name}.toml").read_text()


def _tiny(config: ExperimentConfig) -> ExperimentConfig:
    """The recipe with one 64x64-window step, 64x64 frames, on the CPU."""
    small = {"steps": 1, "warmup": 0, "crop": "64x64", "threshold": 0.3}
    options = {**config.method.options, **small}
    method = replace(config.method, options=options, source=config.method.source.with_(size=(H, W)))
    return replace(
        config,
        compute=Compute("cpu", "off"),
        method=method,
        sites=tuple(replace(s, data=s.data.with_(size=(H, W))) for s in config.sites),
        eval_sets=tuple(replace(e, data=e.data.with_(size=(H, W))) for e in config.eval_sets),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_the_recipe_adapts_a_site_and_scores_it_on_tiny_trees_of_its_datasets(name, tmp_path):
    """The recipe's own pieces, as ``fedmerge compare`` chains them: its start (wrapped for HRDA), one site's
    adaptation with its options and feature distance, both evaluation sets. Merging is the same for every
    architecture and is tested elsewhere; one site keeps this under a minute for an 85 M-parameter model."""
    arch = RECIPES[name]
    config = _load(name, tmp_path)
    _tree(tmp_path, arch, Path(config.source.checkpoint).name)
    tiny = _tiny(config)
    source = load_source(tiny.source, tmp_path / "cache")
    assert source.arch == f"hrda_{arch}" and source.num_classes == 19
    pool = ModelPool(source, tiny.method, tiny.seed, tmp_path / "cache", tiny.compute)
    site = tiny.site("idd")
    entry = pool.get(site.name, build_dataset(site.data), str(site.data))
    metrics = entry.update.metrics
    assert metrics["multires"] == 1.0 and math.isfinite(metrics["train-loss"])
    assert metrics["train-feature-distance"] > 0.0  # the ImageNet reference is loaded and compared
    scores = TaskPool(tiny.eval_sets, tiny.eval_batch_size, tiny.compute).score(source, entry.update.state_dict())
    assert set(scores.per_domain) == {"cityscapes", "idd"}
    assert all(0.0 <= v <= 1.0 for v in scores.per_domain.values())


def test_a_crop_cuts_one_window_per_image_the_same_in_image_and_label():
    images = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    labels = images[:, 0].long()
    gen = torch.Generator(device="cpu").manual_seed(0)
    cut_images, cut_labels = random_crop(gen, (4, 4), images, labels)
    assert cut_images.shape == (2, 3, 4, 4) and cut_labels.shape == (2, 4, 4)
    assert torch.equal(cut_images[:, 0].long(), cut_labels)
    for i in range(2):  # each window is a real window of its own image
        top, left = divmod(int(cut_labels[i, 0, 0] - labels[i, 0, 0]), 8)
        assert torch.equal(cut_images[i], images[i, :, top : top + 4, left : left + 4])
    (whole,) = random_crop(gen, (10, 10), images)
    assert torch.equal(whole, images)  # a window larger than the image keeps it whole
