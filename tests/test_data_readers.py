"""DataSpec parsing and the on-disk readers, each on a tiny tree in its exact layout."""

from __future__ import annotations

import pytest

from common.data import DataSpec, TimeSplit


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
        ("synthetic?time=middle:3", "'first' or 'last'"),
        ("synthetic?time=first:1.5", r"fraction must be in \(0, 1\]"),
        ("synthetic?n=abc", "expected an integer"),
    ],
)
def test_spec_parse_rejects_bad_text_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSpec.parse(text)


def test_spec_from_flower_config_treats_empty_strings_as_unset() -> None:
    config = {
        "eval-dataset": "camvid",
        "eval-data-root": "/data/camvid",
        "eval-split": "test",
        "eval-domain": "",
        "eval-time-split": "last:0.3",
        "eval-size": "",
        "eval-num-images": 12,
        "eval-seed": 0,
    }
    spec = DataSpec.from_config(config, prefix="eval-")
    assert spec == DataSpec("camvid", "/data/camvid", "test", None, TimeSplit("last", fraction=0.3), None, 12, 0)
    assert DataSpec.from_config({"dataset": "synthetic", "domain": "fog", "size": "48x64"}).size == (48, 64)
    with pytest.raises(ValueError, match="no dataset key"):
        DataSpec.from_config({"data-root": "/x"})


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
