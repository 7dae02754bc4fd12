"""Devices and mixed precision: settings checked by name, a missing GPU refused in one line, amp where a site trains.

Tests that need CUDA are marked ``cuda`` and skipped without it. Everything else runs on
the CPU of any machine: where a test is about a machine *without* CUDA, it makes torch
answer so (``no_cuda``), so it means the same on a GPU box.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clients.adaptation import AdaptContext
from clients.adaptation.loop import TrainState, run_training
from clients.adaptation.optim import Schedule, build_optimizer
from clients.config import SiteConfig
from clients.site import SiteJob, adapt_site
from common.bn.stats import BNStatsConfig, collect_bn_sums
from common.config.run import ConfigError, RunConfig, declared_defaults
from common.data import image_batches, make_loader
from common.device.runtime import Precision, autocast, model_device, resolve_compute
from common.device.spec import Compute, DeviceError
from common.models.factory import build_model
from common.scoring.evaluation import evaluate_domain
from common.updates.files import load_site_update
from experiments.config import ExperimentConfig
from fedmerge.cli import main as cli_main
from server.runtime import simulation_config
from server.simulation import check_devices

NUM_CLASSES = 9
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FOG = "synthetic:?domain=fog&n=4&size=32x48"
SOURCE = "synthetic:?domain=source&n=4&size=32x48"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _model(state: dict, arch: str = "tiny_unet") -> torch.nn.Module:
    model = build_model(arch, NUM_CLASSES)
    (model.base if arch.startswith("hrda_") else model).load_state_dict(state)
    return model


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "device,amp,message",
    [
        ("gpu", "off", "device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
        ("cuda:x", "off", "not 'cuda:x'"),
        ("cpu", "fp8", "amp must be one of off, bf16, fp16, not 'fp8'"),
    ],
)
def test_a_misspelt_device_or_amp_is_refused_by_name(device, amp, message):
    with pytest.raises(DeviceError, match=message):
        Compute(device, amp)
    with pytest.raises(ConfigError, match=message):
        RunConfig.read({"device": device, "amp": amp})


def test_num_gpus_must_not_be_negative_and_reaches_rays_client_resources():
    with pytest.raises(ConfigError, match="num-gpus must be >= 0"):
        RunConfig.read({"num-gpus": -0.5})
    assert simulation_config(3)["client-resources-num-gpus"] == 0.0
    assert simulation_config(3, 0.5)["client-resources-num-gpus"] == 0.5


def test_auto_is_the_cpu_and_cuda_is_one_line_where_torch_sees_no_gpu(no_cuda):
    assert resolve_compute(Compute("auto", "bf16")) == Compute("cpu", "bf16")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError) as info:
            resolve_compute(Compute(device))
        assert str(info.value) == (f"device {device!r} asked for, but torch sees no CUDA device on this machine; "
                                   "use device 'cpu' or 'auto'")  # fmt: skip


def test_node_config_sets_a_sites_own_device_over_the_run_config():
    run = {**declared_defaults(), "device": "cpu"}
    site = SiteConfig.from_flower(run, {"partition-id": 0, "device": "auto", "amp": "bf16"})
    assert site.job().context.compute == Compute("auto", "bf16")
    assert SiteConfig.from_flower(run, {"partition-id": 0}).job().context.compute == Compute("cpu", "off")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"device": "cuda"}, "device 'cuda' asked for, but torch sees no CUDA device"),
        ({"device": "auto", "num-gpus": 1.0}, "num-gpus = 1.0 asks Ray for more than the 0 CUDA device(s)"),
        ({"num-gpus": 0.5}, "num-gpus = 0.5 reserves GPUs for sites that compute on the CPU"),
        ({"device": "cuda:1", "num-gpus": 1.0}, "Ray shows each simulated site only its own GPU, as cuda:0"),
    ],
)
def test_a_simulation_checks_the_gpus_its_sites_will_ask_for(no_cuda, changes, message):
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_devices(RunConfig.read(changes))
    check_devices(RunConfig.read({"device": "auto"}))  # the CPU, here: nothing to refuse


def test_an_experiment_config_names_its_device_and_amp():
    base = {
        "source": {"pretrain": {"data": "synthetic:?domain=source&n=4&size=16x16", "arch": "tiny_unet", "steps": 1}},
        "sites": [{"name": "fog", "data": "synthetic:?domain=fog&n=2&size=16x16"}],
        "eval": [{"domain": "fog", "data": "synthetic:?domain=fog&n=2&size=16x16"}],
        "strategies": ["gaussian"],
    }
    assert ExperimentConfig.from_dict(base, "t").compute == Compute("cpu", "off")
    assert ExperimentConfig.from_dict({**base, "device": "cuda", "amp": "bf16"}, "t").compute == Compute("cuda", "bf16")
    with pytest.raises(ValueError, match="t: amp must be one of off, bf16, fp16, not 'half'"):
        ExperimentConfig.from_dict({**base, "amp": "half"}, "t")


def test_only_a_gpu_or_an_amp_changes_a_cache_key():
    assert Compute("cpu", "off").recipe() == {}
    assert Compute("cuda:1", "off").recipe() == Compute("cuda:0", "off").recipe() == {"compute": "cuda/off"}
    assert Compute("cpu", "bf16").recipe() == {"compute": "cpu/bf16"}


# ---------------------------------------------------------------- the command line without CUDA


def _commands(tmp_path: Path, checkpoint: Path) -> dict[str, list[str]]:
    out = str(tmp_path / "out.safetensors")
    return {
        "pretrain": ["pretrain", "--data", SOURCE, "--arch", "tiny_unet", "--steps", "1", "--out", out],
        "adapt": ["adapt", "--method", "adabn", "--model", str(checkpoint), "--data", FOG, "--out", out],
        "evaluate": ["evaluate", str(checkpoint), "--data", FOG, "--out", str(tmp_path / "out.json")],
        "compare": ["compare", "--config", "synthetic-4", "--out-dir", str(tmp_path / "compare")],
        "simulate": ["simulate", "--preset", "tiny", "--out-dir", str(tmp_path / "simulate")],
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_pretrained_state) -> Path:
    from common.data import dataset_classes
    from common.models.checkpoints import save_checkpoint

    path = tmp_path_factory.mktemp("device") / "start.safetensors"
    save_checkpoint(_model(tiny_pretrained_state), path, "tiny_unet", dataset_classes("synthetic", ""))
    return path


@pytest.mark.parametrize("command", ["pretrain", "adapt", "evaluate", "compare", "simulate"])
def test_device_cuda_without_cuda_is_one_line_and_exit_2_before_any_work(no_cuda, command, tmp_path, checkpoint,
                                                                          capsys):  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    assert cli_main([*_commands(work, checkpoint)[command], "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"fedmerge {command}: error: device 'cuda' asked for, but torch sees no CUDA device on "
                            "this machine; use device 'cpu' or 'auto'\n")  # fmt: skip
    assert not list(work.iterdir())  # nothing written, no Flower home, no cache


def test_device_auto_without_cuda_adapts_on_the_cpu_to_the_same_bits(no_cuda, tmp_path, checkpoint, capsys):
    files = {}
    for device in ("auto", "cpu"):
        files[device] = tmp_path / f"{device}.safetensors"
        argv = ["adapt", "--method", "tent", "--set", "steps=2", "--model", str(checkpoint), "--data", FOG,
                "--out", str(files[device]), "--device", device, "--quiet"]  # fmt: skip
        assert cli_main(argv) == 0
        assert "tiny_unet, cpu) in" in capsys.readouterr().out
    auto, _ = load_site_update(files["auto"])
    cpu, _ = load_site_update(files["cpu"])
    assert auto.state_dict().keys() == cpu.state_dict().keys()
    for key, value in auto.state_dict().items():
        assert torch.equal(value, cpu.state_dict()[key]), key


def test_a_site_set_to_auto_computes_on_the_cpu_here(no_cuda, tiny_pretrained_state, tiny_target):
    job = SiteJob("fog", "tent", {"steps": 1}, 4, context=AdaptContext(progress=False, compute=Compute("auto")))
    model = _model(tiny_pretrained_state)
    update = adapt_site(model, tiny_target, job)
    assert job.context.compute == Compute("cpu")
    assert model_device(model).type == "cpu"
    assert {t.device.type for t in update.state_dict().values()} == {"cpu"}


# ---------------------------------------------------------------- mixed precision


def test_the_exact_statistics_are_float64_sums_of_float32_activations_under_bf16_autocast(
    tiny_pretrained_state, tiny_target
):
    model = _model(tiny_pretrained_state)
    plain = collect_bn_sums(model, image_batches(tiny_target, 4), BNStatsConfig("batch"))
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        under_amp = collect_bn_sums(model, image_batches(tiny_target, 4), BNStatsConfig("batch"))
    for layer, sums in under_amp.items():
        assert sums.sum.dtype == sums.sum_sq.dtype == torch.float64 and sums.count.dtype == torch.int64
        assert torch.equal(sums.sum, plain[layer].sum) and torch.equal(sums.sum_sq, plain[layer].sum_sq), layer


@pytest.mark.parametrize("method,arch", [("hrda", "hrda_tiny_unet"), ("selftrain", "tiny_unet")])
def test_a_bf16_site_trains_under_autocast_and_ships_exact_float32_statistics(
    method, arch, tiny_pretrained_state, tiny_source, tiny_target
):
    options = {"steps": 2, "warmup": 0, "lr": 1e-3, "bn-refresh": 0, "threshold": 0.3}
    updates = {}
    for amp in ("off", "bf16"):
        context = AdaptContext(source=tiny_source, progress=False, compute=Compute("cpu", amp))
        model = _model(tiny_pretrained_state, arch)
        updates[amp] = adapt_site(model, tiny_target, SiteJob("fog", method, options, 4, context=context))
    bf16 = updates["bf16"]
    assert bf16.metrics["train-loss"] != updates["off"].metrics["train-loss"]  # autocast was in effect
    assert all(bool(torch.isfinite(v).all()) for v in bf16.params.values())
    assert {v.dtype for k, v in bf16.buffers.items() if "running_" in k} == {torch.float32}
    assert {v.dtype for v in bf16.counts.values()} == {torch.int64}
    shipped = build_model(arch, NUM_CLASSES)
    shipped.load_state_dict(bf16.state_dict(), strict=False)
    again = collect_bn_sums(shipped, image_batches(tiny_target, 4), BNStatsConfig("batch"))
    for layer, sums in again.items():  # what a float32 pass of the shipped parameters measures
        torch.testing.assert_close(bf16.buffers[f"{layer}.running_mean"], sums.mean().float(), rtol=0, atol=0)
        torch.testing.assert_close(bf16.buffers[f"{layer}.running_var"], sums.var().float(), rtol=0, atol=0)


def test_evaluation_runs_under_bf16_autocast(tiny_pretrained_state, tiny_target):
    model = _model(tiny_pretrained_state)
    full = evaluate_domain(model, make_loader(tiny_target, 4), NUM_CLASSES)
    half = evaluate_domain(model, make_loader(tiny_target, 4), NUM_CLASSES, amp="bf16")
    assert half.num_images == full.num_images and 0.0 <= half.miou <= 1.0
    assert abs(half.miou - full.miou) < 0.1


def test_off_is_the_full_precision_code_path():
    precision = Precision("cpu", "off")
    assert not precision.scaler.is_enabled() and precision.state_dict() == {}
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")


def _fp16_state() -> TrainState:
    torch.manual_seed(0)
    model = build_model("tiny_unet", 3)
    state = TrainState(model, build_optimizer(model, lr=1e-3), precision=Precision("cpu", "fp16"))
    state.precision.scaler = torch.amp.GradScaler("cpu", growth_interval=1)  # the scale moves every step
    return state


def _fp16_step(state: TrainState, crash_at: int | None = None):
    def step(t: int, gen: torch.Generator) -> dict[str, float]:
        if t == crash_at:
            raise RuntimeError("simulated crash")
        x = torch.rand(2, 3, 16, 16, generator=gen, device=gen.device)
        with state.precision.autocast():
            loss = state.model(x).float().pow(2).mean()
        state.optimizer.zero_grad()
        state.precision.backward(loss)
        state.precision.step(state.optimizer)
        return {"loss": loss.item()}

    return step


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path):
    schedule = Schedule(steps=5)
    ref = _fp16_state()
    run_training(ref, _fp16_step(ref), schedule, AdaptContext(progress=False), name="toy", config="c", num_target=1)
    context = AdaptContext(progress=False, checkpoint_dir=str(tmp_path), compute=Compute("cpu", "fp16"))
    crashed = _fp16_state()
    with pytest.raises(RuntimeError):
        run_training(crashed, _fp16_step(crashed, crash_at=3), schedule, context, name="toy", config="c",
                     num_target=1, checkpoint_every=2)  # fmt: skip
    resumed = _fp16_state()
    run_training(resumed, _fp16_step(resumed), schedule, context, name="toy", config="c", num_target=1,
                 checkpoint_every=2)  # fmt: skip
    assert resumed.precision.scaler.get_scale() == ref.precision.scaler.get_scale() > 65536.0
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_fp16_trains_on_the_cpu_too(tiny_pretrained_state, tiny_target):
    """torch 2.14 has fp16 autocast on the CPU (slow, but correct), so it is not refused there."""
    context = AdaptContext(progress=False, compute=Compute("cpu", "fp16"))
    update = adapt_site(_model(tiny_pretrained_state), tiny_target, SiteJob("fog", "tent", {"steps": 2}, 4,
                                                                            context=context))  # fmt: skip
    assert context.metrics["train-loss"] > 0
    assert all(bool(torch.isfinite(v).all()) for v in update.params.values())


# ---------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@CUDA
def test_a_site_adapted_on_the_gpu_measures_the_statistics_a_cpu_pass_measures(tiny_pretrained_state, tiny_target,
                                                                               monkeypatch):  # fmt: skip
    """The GPU site's update against CPU passes, TF32 off so both devices compute float32 convolutions.

    - The exact statistics it ships equal those a CPU pass measures under its parameters to
      rtol 1e-4 / atol 1e-5 (float32 convolutions summed in a different order; float64 sums on
      both), and the counts exactly.
    - Its first step's cross-entropy equals a CPU run's to rtol 1e-4: both start from the same
      AdaBN statistics and draw the same batch, jitter and blur (CPU generators), so a draw
      made on the GPU's generator would show here as a different loss.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    options = {"steps": 3, "warmup": 0, "lr": 1e-3, "augment": True, "threshold": 0.3, "bn-refresh": 2}
    updates = {}
    for device in ("cuda", "cpu"):
        context = AdaptContext(progress=False, seed=1, compute=Compute(device))
        updates[device] = adapt_site(_model(tiny_pretrained_state), tiny_target,
                                     SiteJob("fog", "selftrain", options, 4, context=context))  # fmt: skip
    gpu = updates["cuda"]
    assert {t.device.type for t in gpu.state_dict().values()} == {"cpu"}  # what leaves the site
    on_cpu = build_model("tiny_unet", NUM_CLASSES)
    on_cpu.load_state_dict(gpu.state_dict(), strict=False)
    cpu_sums = collect_bn_sums(on_cpu, image_batches(tiny_target, 4), BNStatsConfig("batch"))
    for layer, sums in cpu_sums.items():
        assert torch.equal(gpu.counts[layer], sums.count)
        torch.testing.assert_close(gpu.buffers[f"{layer}.running_mean"], sums.mean().float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gpu.buffers[f"{layer}.running_var"], sums.var().float(), rtol=1e-4, atol=1e-5)
    first = {device: update.metrics["train-ce-start"] for device, update in updates.items()}
    assert first["cuda"] == pytest.approx(first["cpu"], rel=1e-4)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_hrda_trains_on_the_gpu_at_reduced_precision(amp, tiny_pretrained_state, tiny_source, tiny_target):
    context = AdaptContext(source=tiny_source, progress=False, compute=Compute("cuda", amp))
    model = _model(tiny_pretrained_state, "hrda_tiny_unet")
    options = {"steps": 2, "warmup": 0, "threshold": 0.3}
    update = adapt_site(model, tiny_target, SiteJob("fog", "hrda", options, 4, context=context))
    assert model_device(model).type == "cuda" and context.metrics["train-loss"] > 0
    assert {v.device.type for v in update.state_dict().values()} == {"cpu"}
    assert {v.dtype for v in update.counts.values()} == {torch.int64}
    assert all(bool(torch.isfinite(v).all()) for v in update.params.values())
