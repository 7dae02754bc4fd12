"""Every class of bad input tried against the merge, and what happened: a table for BENCHMARKS.md.

Each row feeds one bad reply, file, flag or config through the code a real run uses
(``ReplyIntake`` and the merge engine, ``fedmerge`` in-process, the run-config reader) and
prints the outcome as the user sees it: the one-line error or incident, and whether the
good sites' merge was untouched.

    .venv/bin/python benchmarks/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, MetricRecord

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.config.run import RunConfig  # noqa: E402
from common.merge.engine import MergeEngine  # noqa: E402
from common.models.factory import build_model  # noqa: E402
from common.updates.files import save_site_update  # noqa: E402
from experiments.config import ExperimentConfig  # noqa: E402
from fedmerge.cli import main as cli_main  # noqa: E402
from server.intake import ReplyIntake  # noqa: E402
from server.report import MergeReport  # noqa: E402
from tests.fakes import perturbed, reply_of, site_update, spec  # noqa: E402

torch.manual_seed(0)
TEMPLATE = build_model("tiny_unet", 4).state_dict()
GOOD = [site_update(f"good{i}", perturbed(TEMPLATE, i), num_examples=4, per_image=6) for i in range(2)]


def _clean() -> dict[str, torch.Tensor]:
    engine = MergeEngine(spec(), TEMPLATE)
    for update in GOOD:
        engine.ingest(update)
    return engine.result()


CLEAN = _clean()


def reply_case(change: Callable) -> str:
    """A bad reply between two good ones, through the server's intake."""
    bad = reply_of(site_update("evil", perturbed(TEMPLATE, 9), num_examples=4, per_image=6))
    change(bad.content)
    engine, report = MergeEngine(spec(), TEMPLATE), MergeReport()
    intake = ReplyIntake(engine, report)
    intake.take_update(reply_of(GOOD[0], 1), 1)
    took = intake.take_update(bad, 2)
    intake.take_update(reply_of(GOOD[1], 3), 3)
    untouched = all(torch.equal(engine.result()[k], v) for k, v in CLEAN.items())
    if took:
        return "merged"
    return f"refused: {report.incidents[0].reason}; good sites merged as without it: {untouched}"


def cli_case(args: list[str]) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(args)
    return f"exit {code}: {err.getvalue().strip()}"


def config_case(values: dict) -> str:
    try:
        RunConfig.read(values)
    except ValueError as exc:
        return f"refused: {exc}"
    return "accepted"


def _set_count(content, value) -> None:
    content["counts"] = MetricRecord({**content["counts"], "num-examples": value})


def _rows(tmp: Path) -> list[tuple[str, str, str]]:
    good_file = tmp / "good.safetensors"
    save_site_update(good_file, GOOD[0], "tiny_unet", 4)
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(good_file.read_bytes()[:200])
    out = str(tmp / "m.safetensors")
    nan = lambda c: c["params"].__setitem__("classifier.1.bias", _array(torch.full((4,), float("nan"))))  # noqa: E731
    return [
        ("reply", "a NaN parameter", reply_case(nan)),
        ("reply", "num-examples = inf", reply_case(lambda c: _set_count(c, float("inf")))),
        ("reply", "a BN count of 2^63", reply_case(
            lambda c: c.__setitem__("counts", MetricRecord({**c["counts"], next(
                k for k in c["counts"] if k.startswith("bn:")): [2**63] * 8})))),
        ("reply", "a negative variance", reply_case(lambda c: c["buffers"].__setitem__(
            "backbone.encoder.stem.0.1.running_var", _array(-torch.ones(8))))),
        ("reply", "a wrong shape", reply_case(lambda c: c["params"].__setitem__(
            "classifier.1.bias", _array(torch.zeros(7))))),
        ("reply", "no params record", reply_case(lambda c: c.__delitem__("params"))),
        ("reply", "domain '../../x' (save-updates)", _saved_as(tmp, "../../x")),
        ("reply", "domain of 300 characters (save-updates)", _saved_as(tmp, "y" * 300)),
        ("reply", "counts claimed 10^6 times the real ones", _liar_share()),
        ("reply", "an empty domain string", reply_case(lambda c: c.__setitem__("info", ConfigRecord({"domain": ""})))),
        ("file", "truncated safetensors", cli_case(["merge", str(good_file), str(corrupt), "--out", out])),
        ("flag", "--weights inf,1", cli_case(["merge", str(good_file), str(good_file), "--weights", "inf,1",
                                               "--out", out])),
        ("flag", "--out equal to an input", cli_case(["merge", str(good_file), "--out", str(good_file)])),
        ("flag", "--out x.pt", cli_case(["merge", str(good_file), "--out", str(tmp / "x.pt")])),
        ("flag", "data synth into a non-empty folder", cli_case(["data", "synth", "--out", str(tmp)])),
        ("flag", "deploy keys --names 'a<newline>b'", cli_case(["deploy", "keys", "--out", str(tmp / "k"),
                                                                "--names", "a\nb"])),
        ("run config", "recalibrate = 'False'", config_case({"recalibrate": "False"})),
        ("run config", "min-sites = 'abc'", config_case({"min-sites": "abc"})),
        ("run config", "bufer-mode = 'gaussian'", config_case({"bufer-mode": "gaussian"})),
        ("compare config", "sites = 'fog'", _compare_case({"sites": "fog"})),
        ("compare config", "strategies = ['gausian']", _compare_case({"strategies": ["gausian"]})),
    ]  # fmt: skip


def _saved_as(tmp: Path, domain: str) -> str:
    from server.results import save_update

    out = tmp / "out"
    run = RunConfig.read({"out-dir": str(out), "arch": "tiny_unet", "num-classes": 4})
    path = save_update(out, 7, site_update(domain, TEMPLATE, num_examples=4, per_image=6), run)
    return f"saved as {path.relative_to(out)} (inside out-dir: {path.resolve().is_relative_to(out.resolve())})"


def _liar_share() -> str:
    """The liar's share of the BN pooling under the default settings."""
    liar = site_update("liar", perturbed(TEMPLATE, 5), num_examples=4 * 10**6, per_image=6)
    engine = MergeEngine(RunConfig.defaults().merge_spec(), TEMPLATE)
    for update in [*GOOD, liar]:
        engine.ingest(update)
    pool = engine.buffers.pool
    weights = torch.tensor([e[2].weight[0] for e in sorted(pool.entries, key=lambda e: (e[0], e[1]))])
    from common.merge.bn_pooling import capped_shares

    share = float(capped_shares(weights.numpy()[:, None], engine.spec.max_share)[-1, 0])
    return f"merged; its share of the BN pooling is {share:.3f} (max-site-share {engine.spec.max_share})"


def _array(value: torch.Tensor):
    from flwr.app import ArrayRecord

    return ArrayRecord({"v": value})["v"]


def _compare_case(change: dict) -> str:
    raw = {"source": {"checkpoint": "x.safetensors"}, "sites": [{"name": "fog", "data": "synthetic"}],
           "eval": [{"domain": "fog", "data": "synthetic"}], "strategies": ["gaussian"], **change}  # fmt: skip
    try:
        ExperimentConfig.from_dict(raw, "t")
    except ValueError as exc:
        return f"refused: {exc}"
    return "accepted"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = _rows(Path(tmp))
    print("| surface | bad input | outcome |\n|---|---|---|")
    for surface, what, outcome in rows:
        print(f"| {surface} | {what} | {outcome.replace('|', '/').replace(tmp, '<tmp>')} |")


if __name__ == "__main__":
    main()
