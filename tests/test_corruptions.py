"""``corruption=NAME:SEVERITY``: the same pixels everywhere, images only, graded, refused with one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import DataSpec, build_dataset
from common.data.corruptions import CORRUPTIONS, NIGHT_LEVELS, Corruption, corrupt, corruption_seed
from common.data.synthetic import render

ROOT = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("FEDMERGE_CAMVID") or ROOT.parent / "shared/data/camvid")
TINY = "synthetic?domain=source&n=2&size=48x64"
WANTED = ("fog", "frost", "snow", "motion_blur", "defocus_blur", "gaussian_noise", "brightness", "contrast", "night")

DIGEST = """
import sys
threads = int(sys.argv[1])
import numpy as np, torch
torch.set_num_threads(threads)
np.random.seed(threads)  # whatever the caller did to numpy's global generator must not matter
from common.data.corruptions import load_imagecorruptions
load_imagecorruptions().cv2.setNumThreads(threads)
from tests.test_corruptions import digest_of_every_corruption
print(digest_of_every_corruption())
"""


def digest_of_every_corruption() -> str:
    """SHA-256 of the images of a tiny synthetic set under every corruption at severity 3."""
    digest = hashlib.sha256()
    for name in CORRUPTIONS:
        dataset = build_dataset(DataSpec.parse(f"{TINY}&corruption={name}:3"))
        for i in range(len(dataset)):
            digest.update(dataset[i][0].numpy().tobytes())
    return digest.hexdigest()


def _structure_lost(corrupted: np.ndarray, clean: np.ndarray) -> float:
    """1 - correlation with the clean pixels: how much of the image a corruption has replaced."""
    return 1.0 - float(np.corrcoef(corrupted.astype(np.float64).ravel(), clean.astype(np.float64).ravel())[0, 1])


def test_the_registry_has_every_corruption_the_experiments_name():
    assert set(WANTED) <= set(CORRUPTIONS)


def test_same_bytes_in_two_processes_with_one_and_two_threads_and_in_this_one():
    def child(threads: int) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env |= {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        command = [sys.executable, "-c", DIGEST, str(threads)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    children = [child(1), child(2)]
    np.random.seed(12345)
    here = digest_of_every_corruption()
    outputs = [c.communicate(timeout=120) for c in children]
    for c, (_out, err) in zip(children, outputs, strict=True):
        assert c.returncode == 0, err[-2000:]
    assert [out.strip() for out, _err in outputs] == [here, here]


def test_concurrent_threads_get_the_serial_pixels_and_the_callers_global_state_is_kept():
    image = render("source", 0, 0, (48, 64))[0]
    jobs = [(Corruption(name, 4), f"frame{i}") for i in range(3) for name in ("gaussian_noise", "snow", "frost")]
    serial = [corrupt(image, c, key) for c, key in jobs]
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: corrupt(image, *job), jobs))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded, strict=True))
    assert np.array_equal(np.random.get_state()[1], before)


def test_each_image_key_draws_its_own_randomness():
    image = render("source", 0, 0, (48, 64))[0]
    noise = Corruption("gaussian_noise", 3)
    assert corruption_seed("a.png", "fog") != corruption_seed("b.png", "fog")
    assert corruption_seed("a.png", "fog") != corruption_seed("a.png", "snow")
    assert not np.array_equal(corrupt(image, noise, "a.png"), corrupt(image, noise, "b.png"))
    assert np.array_equal(corrupt(image, noise, "a.png"), corrupt(image, noise, "a.png"))


@pytest.mark.parametrize(
    ("value", "problem"),
    [("fogg:3", "unknown corruption 'fogg'"), ("fog:0", "not 0"), ("fog:6", "not 6"), ("fog", "NAME:SEVERITY")],
)
def test_unknown_names_and_severities_outside_1_to_5_are_refused_in_one_line(value, problem):
    with pytest.raises(ValueError) as caught:
        DataSpec.parse(f"{TINY}&corruption={value}")
    message = str(caught.value)
    assert problem in message
    assert "\n" not in message
    assert all(name in message for name in CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_labels_stay_and_the_image_changes_more_at_severity_5_than_at_1(name):
    clean = build_dataset(DataSpec.parse(TINY))
    mild = build_dataset(DataSpec.parse(f"{TINY}&corruption={name}:1"))
    strong = build_dataset(DataSpec.parse(f"{TINY}&corruption={name}:5"))
    for i in range(len(clean)):
        (image, label), (mild_image, mild_label), (strong_image, strong_label) = clean[i], mild[i], strong[i]
        assert torch.equal(mild_label, label) and torch.equal(strong_label, label)
        assert mild_image.shape == image.shape and mild_image.dtype == torch.float32
        assert float(strong_image.min()) >= 0.0 and float(strong_image.max()) <= 1.0
        lost_1 = _structure_lost(mild_image.numpy(), image.numpy())
        lost_5 = _structure_lost(strong_image.numpy(), image.numpy())
        assert lost_1 > 0.001, f"{name}:1 barely changed image {i}"
        assert lost_5 > lost_1, f"{name}: severity 5 ({lost_5:.4f}) is not worse than 1 ({lost_1:.4f})"


def test_night_is_darker_flatter_and_noisier_with_severity():
    image = render("source", 1, 0, (48, 64))[0]
    levels = [corrupt(image, Corruption("night", s), "n").astype(np.float64) for s in range(1, 6)]
    means = [float(x.mean()) for x in levels]
    assert means == sorted(means, reverse=True) and means[0] < image.mean()
    assert float(levels[-1].std()) < 0.5 * float(image.std())
    flat = np.full_like(image, 128)  # sensor noise: a flat grey frame no longer stays flat
    assert corrupt(flat, Corruption("night", 3), "flat").std() > 0.5
    assert [lv.stops for lv in NIGHT_LEVELS] == sorted(lv.stops for lv in NIGHT_LEVELS)


def test_images_too_small_for_the_library_are_refused_by_size():
    dataset = build_dataset(DataSpec.parse("synthetic?n=1&size=16x24&corruption=fog:2"))
    with pytest.raises(ValueError, match="at least 32x32 pixels, this one is 16x24"):
        dataset[0]


@pytest.mark.parametrize(
    "text",
    [
        "synthetic?domain=fog&n=4&corruption=fog:4",
        "camvid:../shared/data/camvid?split=all&domain=Seq05VD&corruption=fog:4",
        "camvid:/d?split=test&time=first:42&size=90x120&corruption=night:1",
    ],
)
def test_the_key_round_trips_through_parse_and_str(text):
    spec = DataSpec.parse(text)
    assert str(spec) == text
    assert DataSpec.parse(str(spec)) == spec
    assert str(spec.corruption) == text.rsplit("corruption=", 1)[1]


def test_a_spec_without_the_key_prints_none_and_a_dataclass_value_prints_it():
    assert "corruption" not in str(DataSpec.parse(TINY))
    spec = DataSpec("camvid", root="/d", corruption=Corruption("motion_blur", 2))
    assert str(spec) == "camvid:/d?corruption=motion_blur:2"
    assert DataSpec.parse(str(spec)).corruption == Corruption("motion_blur", 2)


def test_the_help_lists_the_key_and_every_name():
    from common.data.spec import SPEC_HELP

    assert "corruption=NAME:SEVERITY" in SPEC_HELP
    assert all(name in SPEC_HELP for name in CORRUPTIONS)


@pytest.mark.skipif(not (CAMVID / "testannot").is_dir(), reason=f"CamVid not found at {CAMVID}")
def test_camvid_frames_keep_labels_and_their_pixels_do_not_depend_on_where_the_root_is(tmp_path):
    query = "?split=test&domain=Seq05VD&n=2&corruption=fog:4"
    moved = tmp_path / "camvid"
    moved.symlink_to(CAMVID.resolve(), target_is_directory=True)
    here, there = (build_dataset(DataSpec.parse(f"camvid:{root}{query}")) for root in (CAMVID, moved))
    clean = build_dataset(DataSpec.parse(f"camvid:{CAMVID}?split=test&domain=Seq05VD&n=2"))
    for i in range(2):
        assert torch.equal(here[i][1], clean[i][1])
        assert torch.equal(here[i][0], there[i][0])
        assert _structure_lost(here[i][0].numpy(), clean[i][0].numpy()) > 0.05
    assert here.base.image_key(0).startswith("test/Seq05VD_")  # type: ignore[attr-defined]


def test_a_run_configs_site_data_carries_the_key_to_each_simulated_site():
    from clients.config import SiteConfig
    from common.config.run import declared_defaults

    run = {**declared_defaults(), "site-data": f"{TINY}&corruption=fog:2; camvid:/d?domain=0001TP&corruption=night:4"}
    sites = [SiteConfig.from_flower(run, {"partition-id": p}).data for p in (0, 1)]
    assert [s.corruption for s in sites] == [Corruption("fog", 2), Corruption("night", 4)]
