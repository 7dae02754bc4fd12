"""DataSpec parsing and the on-disk readers, each on a tiny tree in its exact layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import DataError, DataSpec, TimeSplit, build_dataset, dataset_classes


@pytest.mark.parametrize(
    "text",
    [
        "synthetic",
        "synthetic?domain=fog&n=64&seed=3",
        "camvid:/data/camvid?split=all&domain=0001TP&time=first:42&size=180x240",
        "acdc:/d/acdc?split=val&domain=night&time=last:0.3",
        "folder:/tmp/x y?n=5",
    ],
)
def test_spec_round_trips_through_text(text: str) -> None:
    spec = DataSpec.parse(text)
    assert DataSpec.parse(str(spec)) == spec
    assert str(spec) == text


def test_spec_parse_reads_every_field() -> None:
    spec = DataSpec.parse("camvid:/data/camvid?split=all&domain=0001TP&time=first:42&size=180x240&n=10&seed=2")
    assert spec == DataSpec(
        kind="camvid",
        root="/data/camvid",
        split="all",
        domain="0001TP",
        time_split=TimeSplit("first", count=42),
        size=(180, 240),
        num_images=10,
        seed=2,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mnist", "unknown dataset kind 'mnist'"),
        ("camvid", "needs a root"),
        ("synthetic?colour=red", "unknown key 'colour'"),
        ("synthetic?size=12", "expected HxW"),
        ("synthetic?time=middle:3", "'first', 'last' or 'frames'"),
        ("synthetic?time=first:1.5", r"fraction must be in \(0, 1\]"),
        ("synthetic?n=abc", "expected an integer"),
        ("synthetic?seed=1.5", "expected an integer"),
    ],
)
def test_spec_parse_rejects_bad_text_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSpec.parse(text)


def test_a_spec_list_names_each_item_by_its_prefix_its_domain_or_its_kind() -> None:
    from common.data.spec import fill_domain, parse_spec_list

    items = parse_spec_list(
        "dusk=camvid:/d?split=all&domain=0001TP&time=first:42; camvid:/d/x=y?domain=Seq05VD;;synthetic", "t"
    )
    assert [i.name for i in items] == ["dusk", "Seq05VD", "synthetic"]  # "/d/x=y" is a root, not a name
    assert items[0].spec == DataSpec("camvid", "/d", "all", "0001TP", TimeSplit("first", count=42))
    assert items[1].spec.root == "/d/x=y"
    with pytest.raises(ValueError, match="t: the name 'fog' is given to two specs"):
        parse_spec_list("synthetic?domain=fog;fog=synthetic?domain=rain", "t")
    with pytest.raises(ValueError, match="t: n='x': expected an integer"):
        parse_spec_list("synthetic?n=x", "t")
    assert fill_domain("acdc:/data?domain={domain}&size=64x64", "fog") == "acdc:/data?domain=fog&size=64x64"


def test_time_split_first_and_complementary_last_partition_exactly() -> None:
    for total in range(1, 40):
        for f in (0.1, 0.25, 0.3, 0.5, 0.7, 0.9):
            first = TimeSplit("first", fraction=f).select(total)
            last = TimeSplit("last", fraction=round(1 - f, 6)).select(total)
            assert list(first) + list(last) == list(range(total))
    assert str(TimeSplit.parse("first:42")) == "first:42"
    assert str(TimeSplit.parse("last:0.3")) == "last:0.3"
    with pytest.raises(ValueError, match="asks for 50 frames but the sequence has 10"):
        TimeSplit("first", count=50).select(10)


def test_a_frames_window_keeps_exactly_its_frames_and_round_trips() -> None:
    window = TimeSplit.parse("frames:10-25")
    assert list(window.select(62)) == list(range(10, 25)) and str(window) == "frames:10-25"
    with pytest.raises(ValueError, match="frames up to 25; the sequence has 20"):
        window.select(20)
    for bad in ("frames:9-3", "frames:a-b", "frames:4"):
        with pytest.raises(ValueError, match="frames:A-B"):
            TimeSplit.parse(bad)


# ----------------------------------------------------------------------------- readers on tiny trees

H, W = 4, 6


def _png(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if mode == "P":  # GTA5 labels are palette images: the indices are the ids
        img = img.convert("L").convert("P")
        img.putdata(array.astype(np.uint8).ravel().tolist())
    img.save(path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3))


def _label(values: list[int]) -> np.ndarray:
    """A HxW label whose first row holds ``values`` (rest filled with the first value)."""
    lab = np.full((H, W), values[0])
    flat = lab.ravel()
    flat[: len(values)] = values
    return flat.reshape(H, W)


def _expect(label: torch.Tensor, values: list[int]) -> None:
    assert label.dtype == torch.int64
    assert label.ravel()[: len(values)].tolist() == values


CS_IDS = [7, 8, 11, 26, 24, 31, 33, 0, 6, 9, 30, 255]
CS_TRAIN = [0, 1, 2, 13, 11, 16, 18, 255, 255, 255, 255, 255]


def test_cityscapes_maps_label_ids_to_train_ids_and_sorts_by_city_then_frame(tmp_path) -> None:
    for city, frame in [("zurich", 19), ("aachen", 21), ("aachen", 19)]:
        stem = f"{city}_000000_{frame:06d}"
        _png(tmp_path / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png", _image(frame))
        _png(tmp_path / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png", _label(CS_IDS))
    ds = build_dataset(DataSpec("cityscapes", str(tmp_path), split="val"))
    assert [s.image.name[:20] for s in ds.samples] == [
        "aachen_000000_000019",
        "aachen_000000_000021",
        "zurich_000000_000019",
    ]
    image, label = ds[0]
    assert image.shape == (3, H, W) and torch.allclose(image[:, 0, 0] * 255, torch.tensor(_image(19)[0, 0]).float())
    _expect(label, CS_TRAIN)
    assert len(build_dataset(DataSpec("cityscapes", str(tmp_path), split="val", domain="zurich"))) == 1
    assert len(dataset_classes("cityscapes")) == 19


def test_gta5_reads_palette_labels_with_cityscapes_ids(tmp_path) -> None:
    for name in ("00002.png", "00001.png"):
        _png(tmp_path / "images" / name, _image(1))
        _png(tmp_path / "labels" / name, _label(CS_IDS), mode="P")
    assert Image.open(tmp_path / "labels/00001.png").mode == "P"
    ds = build_dataset(DataSpec("gta5", str(tmp_path)))
    assert [s.image.name for s in ds.samples] == ["00001.png", "00002.png"]
    _expect(ds[1][1], CS_TRAIN)
    with pytest.raises(DataError, match="GTA5 has no 'val' split"):
        build_dataset(DataSpec("gta5", str(tmp_path), split="val"))


def test_idd_maps_level3_ids_onto_the_19_cityscapes_classes(tmp_path) -> None:
    level3 = [0, 1, 2, 3, 4, 8, 9, 12, 20, 22, 24, 25, 255]
    train = [0, 255, 1, 9, 11, 255, 13, 255, 5, 2, 8, 10, 255]
    _png(tmp_path / "leftImg8bit/train/201/frame0029_leftImg8bit.png", _image(2))
    _png(tmp_path / "gtFine/train/201/frame0029_gtFine_labellevel3Ids.png", _label(level3))
    ds = build_dataset(DataSpec("idd", str(tmp_path)))
    _expect(ds[0][1], train)
    _png(tmp_path / "gtFine/train/201/frame0029_gtFine_labellevel3Ids.png", _label([26]))
    with pytest.raises(DataError, match=r"frame0029_gtFine_labellevel3Ids.png: label value\(s\) 26 outside"):
        ds[0]


def _acdc_tree(root, conditions=("fog", "night")) -> None:
    for cond in conditions:
        for frame in (41, 7):
            stem = f"GOPR0475_frame_{frame:06d}"
            _png(root / "rgb_anon" / cond / "train/GOPR0475" / f"{stem}_rgb_anon.png", _image(frame))
            _png(root / "gt" / cond / "train/GOPR0475" / f"{stem}_gt_labelTrainIds.png", _label([0, 18, 255, 10]))


def test_acdc_conditions_are_domains_and_train_ids_pass_through(tmp_path) -> None:
    _acdc_tree(tmp_path)
    ds = build_dataset(DataSpec("acdc", str(tmp_path), domain="night"))
    assert len(ds) == 2 and {ds.domain_of(i) for i in range(2)} == {"night"}
    assert ds.samples[0].image.name == "GOPR0475_frame_000007_rgb_anon.png"
    _expect(ds[0][1], [0, 18, 255, 10])
    assert len(build_dataset(DataSpec("acdc", str(tmp_path)))) == 4
    with pytest.raises(DataError, match=r"no images for domain 'snow' in acdc root .*domains there: fog, .*night"):
        build_dataset(DataSpec("acdc", str(tmp_path), domain="snow"))


def test_acdc_rejects_train_ids_beyond_18(tmp_path) -> None:
    _acdc_tree(tmp_path, ("rain",))
    label = tmp_path / "gt/rain/train/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png"
    _png(label, _label([3, 19, 200]))
    ds = build_dataset(DataSpec("acdc", str(tmp_path)))
    ds[0]  # frame 7 is fine: labels are checked only when read
    with pytest.raises(
        DataError, match=r"GOPR0475_frame_000041_gt_labelTrainIds.png: label value\(s\) 19, 200 outside"
    ):
        ds[1]


def test_dark_zurich_reads_night_sequences(tmp_path) -> None:
    for seq, frame in [("GOPR0356", 321), ("GOPR0356", 12), ("GOPR0594", 5)]:
        stem = f"{seq}_frame_{frame:06d}"
        _png(tmp_path / "rgb_anon/val/night" / seq / f"{stem}_rgb_anon.png", _image(frame))
        _png(tmp_path / "gt/val/night" / seq / f"{stem}_gt_labelTrainIds.png", _label([8, 255]))
    ds = build_dataset(DataSpec("darkzurich", str(tmp_path), split="val"))
    assert [s.image.name[:21] for s in ds.samples] == [
        "GOPR0356_frame_000012",
        "GOPR0356_frame_000321",
        "GOPR0594_frame_000005",
    ]
    _expect(ds[2][1], [8, 255])
    assert len(build_dataset(DataSpec("darkzurich", str(tmp_path), split="val", domain="GOPR0594"))) == 1


def _camvid_tree(root) -> None:
    frames = {
        "train": ["0016E5_07959.png", "0016E5_07961.png", "0001TP_006690.png", "0001TP_006720.png"],
        "val": ["0016E5_07960.png"],
        "test": ["Seq05VD_f00000.png", "Seq05VD_f00030.png", "Seq05VD_f00060.png"],
    }
    for split, names in frames.items():
        for i, name in enumerate(names):
            _png(root / split / name, _image(i))
            _png(root / f"{split}annot" / name, _label([0, 3, 10, 11, i]))


def test_camvid_void_is_ignored_and_sequences_span_splits_in_frame_order(tmp_path) -> None:
    _camvid_tree(tmp_path)
    ds = build_dataset(DataSpec("camvid", str(tmp_path), split="all", domain="0016E5"))
    assert [s.image.name for s in ds.samples] == ["0016E5_07959.png", "0016E5_07960.png", "0016E5_07961.png"]
    _expect(ds[0][1], [0, 3, 10, 255, 0])
    assert len(dataset_classes("camvid")) == 11
    test = build_dataset(DataSpec("camvid", str(tmp_path), split="test", domain="Seq05VD"))
    assert test.samples[0].image.name == "Seq05VD_f00000.png"


def test_camvid_time_split_is_per_sequence_and_never_random(tmp_path) -> None:
    _camvid_tree(tmp_path)
    first = build_dataset(DataSpec.parse(f"camvid:{tmp_path}?split=all&time=first:1"))
    assert [s.image.name for s in first.samples] == ["0001TP_006690.png", "0016E5_07959.png", "Seq05VD_f00000.png"]
    last = build_dataset(DataSpec.parse(f"camvid:{tmp_path}?split=test&domain=Seq05VD&time=last:0.34"))
    assert [s.image.name for s in last.samples] == ["Seq05VD_f00060.png"]
    capped = build_dataset(DataSpec.parse(f"camvid:{tmp_path}?split=all&n=2"))
    assert len(capped) == 2
    with pytest.raises(DataError, match=r"sequence '0001TP'.*asks for 3 frames but the sequence has 2"):
        build_dataset(DataSpec.parse(f"camvid:{tmp_path}?split=train&time=first:3"))


def test_camvid_empty_domain_names_the_domain_the_root_and_what_exists(tmp_path) -> None:
    _camvid_tree(tmp_path)
    with pytest.raises(DataError) as info:
        build_dataset(DataSpec("camvid", str(tmp_path), split="train", domain="Seq05VD"))
    message = str(info.value)
    assert "'Seq05VD'" in message and str(tmp_path) in message and "0001TP, 0016E5" in message


def test_folder_layout_with_classes_txt_and_resize_keeps_labels_nearest(tmp_path) -> None:
    (tmp_path / "classes.txt").write_text("bg\nroad\ncar\n")
    lab = np.zeros((8, 12))
    lab[:, 6:] = 2
    lab[0, 0] = 255
    _png(tmp_path / "images/a.png", np.zeros((8, 12, 3)))
    _png(tmp_path / "labels/a.png", lab)
    ds = build_dataset(DataSpec("folder", str(tmp_path), size=(4, 6)))
    image, label = ds[0]
    assert image.shape == (3, 4, 6) and label.shape == (4, 6)
    assert set(label.unique().tolist()) <= {0, 2, 255} and label[0, 5] == 2 and label[3, 0] == 0
    assert dataset_classes("folder", tmp_path) == ["bg", "road", "car"]
    _png(tmp_path / "labels/a.png", np.full((8, 12), 3))
    with pytest.raises(DataError, match=r"labels/a.png: label value\(s\) 3 outside the class indices 0..2"):
        ds[0]


def test_folder_with_domain_subfolders(tmp_path) -> None:
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for dom in ("fog", "night"):
        _png(tmp_path / dom / "images/0001.png", _image(0))
        _png(tmp_path / dom / "labels/0001.png", _label([1, 0]))
    assert len(build_dataset(DataSpec("folder", str(tmp_path)))) == 2
    ds = build_dataset(DataSpec("folder", str(tmp_path), domain="night"))
    assert len(ds) == 1 and ds.domain_of(0) == "night"


# ----------------------------------------------------------------------------- one clear error per fault


def test_missing_label_file_is_named(tmp_path) -> None:
    _camvid_tree(tmp_path)
    (tmp_path / "trainannot/0001TP_006720.png").unlink()
    with pytest.raises(DataError, match=r"train/0001TP_006720.png: no label file; expected .*trainannot/0001TP_006720"):
        build_dataset(DataSpec("camvid", str(tmp_path)))


def test_corrupt_image_is_named(tmp_path) -> None:
    _camvid_tree(tmp_path)
    (tmp_path / "test/Seq05VD_f00030.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"test/Seq05VD_f00030.png: cannot read the image"):
        build_dataset(DataSpec("camvid", str(tmp_path), split="test"))  # named when the set is built
    ds = build_dataset(DataSpec("camvid", str(tmp_path), split="test", size=(4, 6)))  # a resized set reads lazily
    ds[0]
    with pytest.raises(DataError, match=r"test/Seq05VD_f00030.png: cannot read the image"):
        ds[1]


def test_truncated_image_is_named(tmp_path) -> None:
    _camvid_tree(tmp_path)
    path = tmp_path / "val/0016E5_07960.png"
    _png(path, np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"val/0016E5_07960.png: cannot read the image"):
        build_dataset(DataSpec("camvid", str(tmp_path), split="val"))[0]


def test_label_out_of_range_rgb_label_and_size_mismatch_are_named(tmp_path) -> None:
    _camvid_tree(tmp_path)
    _png(tmp_path / "testannot/Seq05VD_f00000.png", _label([0, 12, 11]))
    _png(tmp_path / "testannot/Seq05VD_f00030.png", np.zeros((H, W, 3)))
    _png(tmp_path / "testannot/Seq05VD_f00060.png", np.zeros((H + 1, W)))
    ds = build_dataset(DataSpec("camvid", str(tmp_path), split="test"))
    with pytest.raises(DataError, match=r"Seq05VD_f00000.png: label value\(s\) 12 outside the CamVid ids"):
        ds[0]
    with pytest.raises(DataError, match=r"Seq05VD_f00030.png: a label must be a one-channel image"):
        ds[1]
    with pytest.raises(DataError, match=r"Seq05VD_f00060.png: label is \(5, 6\)"):
        ds[2]


def test_missing_root_and_missing_split_directory_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataSpec("cityscapes", str(tmp_path / "nope")))
    _camvid_tree(tmp_path)
    with pytest.raises(DataError, match=r"nosplit: no CamVid nosplit directory; .* holds: test, testannot"):
        build_dataset(DataSpec("camvid", str(tmp_path), split="nosplit"))
