"""Fuzzing the merge's inputs: hundreds of corrupted site-update files and replies, seeded and of a fixed count.

Each one is merged or refused with one line; no exception escapes, no non-finite value
is ever written, and when it is refused the good sites are merged exactly as without it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from common.merge.engine import Accepted, MergeEngine
from common.models.factory import build_model
from common.updates.files import load_site_update, save_site_update
from server.intake import ReplyIntake
from server.report import MergeReport
from tests.fakes import FakeReply, perturbed, reply_of, site_update, spec

CASES = 600
EXTREMES = [float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, 0.0, -0.0]
COUNT_VALUES = [-1, 0, 2**62, 2**63, 2**70, float("inf"), float("nan"), 1.5, -(2**63), True, "7"]


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    template = build_model("tiny_unet", 4).state_dict()
    good = [site_update(f"good{i}", perturbed(template, i), num_examples=4, per_image=6) for i in range(2)]
    engine = MergeEngine(spec(), template)
    for update in good:
        engine.ingest(update)
    return template, good, engine.result()


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    return bytes(raw)


def _mutate_arrays(record: ArrayRecord, rng: random.Random) -> None:
    key = rng.choice(list(record.keys()))
    value = torch.from_numpy(record[key].numpy().copy())
    kind = rng.choice(["extreme", "dtype", "shape", "drop", "extra"])
    if kind == "extreme" and value.is_floating_point() and value.numel():
        value.view(-1)[rng.randrange(value.numel())] = rng.choice(EXTREMES)
    elif kind == "dtype":
        value = value.to(rng.choice([torch.float64, torch.float16, torch.int32, torch.uint8]))
    elif kind == "shape":
        value = value.reshape(-1)[: max(0, value.numel() - 1)]
    elif kind == "drop":
        del record[key]
        return
    else:
        key = key + rng.choice([".x", "/../y", ""]) + "_"
    record[key] = ArrayRecord({"v": value})["v"]


def _mutate_reply(content, rng: random.Random) -> None:
    target = rng.choice(["params", "buffers", "counts", "info", "metrics", "record"])
    if target in ("params", "buffers", "counts") and target not in content:
        return
    if target in ("params", "buffers"):
        _mutate_arrays(content[target], rng)
    elif target == "counts":
        counts = dict(content["counts"])
        key = rng.choice(list(counts))
        value = rng.choice(COUNT_VALUES)
        if isinstance(counts[key], list) and rng.random() < 0.5:
            value = [value] * rng.choice([len(counts[key]), 1, len(counts[key]) + 3])
        try:
            counts[key] = value
            content["counts"] = MetricRecord(counts)
        except (TypeError, ValueError):  # Flower itself refuses to carry the value: nothing to fuzz
            content["counts"] = MetricRecord({k: v for k, v in counts.items() if k != key})
    elif target == "info":
        junk = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 400)))
        content["info"] = ConfigRecord({"domain": junk, "method": rng.choice(["", "x" * 10])})
    elif target == "metrics":
        content["metrics"] = MetricRecord({"mean-entropy": rng.choice([*EXTREMES[:3], 0.5])})
    else:
        present = [name for name in ("params", "buffers", "counts") if name in content]
        if present:
            del content[rng.choice(present)]


def _check_outcome(world, tmp_path, update_or_reply, case: int) -> None:
    template, good, expected = world
    engine = MergeEngine(spec(), template)
    report = MergeReport()
    intake = ReplyIntake(engine, report)
    intake.take_update(reply_of(good[0], 1), 1)
    if isinstance(update_or_reply, FakeReply):
        accepted = intake.take_update(update_or_reply, 2)
    else:
        outcome = engine.ingest(update_or_reply)
        accepted = isinstance(outcome, Accepted)
        assert accepted or ("\n" not in outcome.reason and outcome.reason), (case, outcome)
    intake.take_update(reply_of(good[1], 3), 3)
    assert len(engine.accepted) == 2 + accepted, case  # the good sites always get in
    for incident in report.incidents:
        assert "\n" not in incident.reason and incident.reason, (case, incident)
    if not accepted:
        result = engine.result()
        assert all(torch.equal(result[k], expected[k]) for k in expected), case  # as if it never came
        return
    path = tmp_path / f"case{case}.safetensors"
    try:
        engine.save(path, "tiny_unet", 4)
    except ValueError as exc:  # a non-finite merge is refused before the file appears
        assert "NaN or Inf" in str(exc) and not path.exists(), case
        return
    written = load_site_update(path)[0].state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in written.values() if v.is_floating_point()), case
    path.unlink()


def test_corrupted_files_and_replies_are_merged_or_refused_with_one_line(world, tmp_path):
    template, _, _ = world
    rng = random.Random(20261129)
    source = tmp_path / "source.safetensors"
    save_site_update(source, site_update("bad", perturbed(template, 7), num_examples=4, per_image=6), "tiny_unet", 4)
    clean_bytes = source.read_bytes()
    kinds = {"file": 0, "reply": 0}
    for done in range(CASES):  # a fixed count, not a time budget: the same cases on any machine
        if done % 2 == 0:
            path = tmp_path / "fuzzed.safetensors"
            path.write_bytes(_flip_bits(clean_bytes, rng))
            try:
                update, _ = load_site_update(path)
            except (ValueError, FileNotFoundError) as exc:  # refused when read: one line, naming the file
                assert "\n" not in str(exc) and "fuzzed.safetensors" in str(exc), str(exc)
            else:
                _check_outcome(world, tmp_path, update, done)
            kinds["file"] += 1
        else:
            reply = reply_of(site_update("bad", perturbed(template, rng.randrange(100)), num_examples=4, per_image=6))
            for _ in range(rng.randint(1, 3)):
                _mutate_reply(reply.content, rng)
            _check_outcome(world, tmp_path, reply, done)
            kinds["reply"] += 1
    assert kinds == {"file": CASES // 2, "reply": CASES // 2}


def test_the_fuzzers_mutations_do_reach_the_checks():
    """A sanity check of the harness: an extreme value in a reply is refused, not silently dropped."""
    torch.manual_seed(0)
    template = build_model("tiny_unet", 4).state_dict()
    reply = reply_of(site_update("bad", perturbed(template, 1), num_examples=4, per_image=6))
    key = next(iter(reply.content["params"].keys()))
    value = reply.content["params"][key].numpy().copy()
    value.reshape(-1)[0] = np.nan
    reply.content["params"][key] = ArrayRecord({"v": torch.from_numpy(value)})["v"]
    report, engine = MergeReport(), MergeEngine(spec(), template)
    assert not ReplyIntake(engine, report).take_update(reply, 5)
    [incident] = report.incidents  # one incident: this reply, refused by the tensor check that names the value
    assert (incident.node_id, incident.domain, incident.kind) == (5, "bad", "refused")
    assert "NaN" in incident.reason and key in incident.reason and not engine.accepted
