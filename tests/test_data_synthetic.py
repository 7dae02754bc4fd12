"""The synthetic domains: deterministic, labeled, layout-faithful across styles, and fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data import (
    SYNTHETIC_STYLES,
    DataSpec,
    TimeSplit,
    build_dataset,
    dataset_classes,
    image_batches,
    make_loader,
)
from common.data.synthetic import render


def test_items_have_the_documented_types_and_ranges() -> None:
    ds = build_dataset(DataSpec(kind="synthetic", domain="fog", num_images=4))
    assert len(ds) == 4
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 128)
    assert label.dtype == torch.int64 and label.shape == (96, 128)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert int(label.max()) < len(dataset_classes("synthetic")) == 9


def test_same_seed_gives_identical_tensors_and_another_seed_does_not() -> None:
    a = build_dataset(DataSpec(kind="synthetic", domain="night", num_images=3, seed=5))
    b = build_dataset(DataSpec(kind="synthetic", domain="night", num_images=3, seed=5))
    c = build_dataset(DataSpec(kind="synthetic", domain="night", num_images=3, seed=6))
    for i in range(3):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][1], c[0][1])


@pytest.mark.parametrize("style", [s for s in SYNTHETIC_STYLES if s not in ("source", "rain")])
def test_appearance_styles_keep_the_source_scene(style: str) -> None:
    for i in range(3):
        src_image, src_label = render("source", i, seed=3)
        image, label = render(style, i, seed=3)
        assert np.array_equal(label, src_label)
        assert np.abs(image.astype(int) - src_image.astype(int)).mean() > 10  # yet it looks different


def test_rain_shifts_the_layout_lower_horizon_and_more_cars() -> None:
    n = 24
    src = [render("source", i)[1] for i in range(n)]
    rain = [render("rain", i)[1] for i in range(n)]
    ground_rows = lambda labels: np.mean([np.isin(lab, (2, 3)).any(1).sum() for lab in labels])  # noqa: E731
    car_frac = lambda labels: np.mean([(lab == 5).mean() for lab in labels])  # noqa: E731
    assert ground_rows(rain) < 0.85 * ground_rows(src)
    assert car_frac(rain) > 1.3 * car_frac(src)


def test_every_class_appears_and_objects_come_at_several_scales() -> None:
    labels = np.stack([render("source", i)[1] for i in range(24)])
    present = set(np.unique(labels).tolist())
    assert present == set(range(9))
    car_heights = [int((lab == 5).any(1).sum()) for lab in labels if (lab == 5).any()]
    assert max(car_heights) > 3 * min(car_heights)


def test_styles_change_image_statistics_the_way_their_weather_does() -> None:
    def mean_image(style: str) -> np.ndarray:
        return np.stack([render(style, i)[0] for i in range(8)]).astype(np.float32) / 255

    src, night, fog = mean_image("source"), mean_image("night"), mean_image("fog")
    assert night.mean() < 0.4 * src.mean()  # night is dark
    assert night[..., 2].mean() > night[..., 0].mean()  # and blue
    assert fog.std() < 0.7 * src.std()  # fog washes out contrast


def test_time_split_partitions_the_generated_sequence() -> None:
    first = build_dataset(
        DataSpec(kind="synthetic", domain="snow", num_images=10, time_split=TimeSplit.parse("first:0.7"))
    )
    last = build_dataset(
        DataSpec(kind="synthetic", domain="snow", num_images=10, time_split=TimeSplit.parse("last:0.3"))
    )
    assert [i for _, i in first.items] == list(range(7))
    assert [i for _, i in last.items] == [7, 8, 9]


def test_all_styles_when_no_domain_and_size_is_rendered_natively() -> None:
    ds = build_dataset(DataSpec(kind="synthetic", num_images=2, size=(48, 64)))
    assert len(ds) == 2 * len(SYNTHETIC_STYLES)
    assert ds[3][0].shape == (3, 48, 64)
    with pytest.raises(ValueError, match="unknown synthetic style 'smog'"):
        build_dataset(DataSpec(kind="synthetic", domain="smog"))


def test_loaders_are_deterministic_and_image_batches_hold_images_only() -> None:
    ds = build_dataset(DataSpec(kind="synthetic", domain="tint", num_images=6))

    def order(seed: int, shuffle: bool = True) -> list[int]:  # each item named by its label's sum (all distinct)
        return [int(lab.sum()) for _, labs in make_loader(ds, 2, shuffle=shuffle, seed=seed) for lab in labs]

    items = [int(ds[i][1].sum()) for i in range(len(ds))]
    assert len(set(items)) == len(ds) and order(1, shuffle=False) == items
    assert order(1) == order(1) and sorted(order(1)) == sorted(items)  # every item once, the same way each time
    assert order(1) != order(2)  # and the seed does choose the order
    batches = list(image_batches(ds, 4))
    assert [b.shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat(batches), torch.stack([ds[i][0] for i in range(len(ds))]))  # the images, in order
    assert [b.shape[0] for b in image_batches(ds, 4)] == [4, 2]  # iterable more than once
