"""dfclip.runtime and the GPU settings that a CPU can check: device choice (torchrun ranks, a
driver torch cannot use), the TF32 switch shared by fit/evaluate/predict, the extraction
precision default, and the sweep's gloo barrier timeout."""

from __future__ import annotations

import datetime

import pytest
import torch

from dfclip import runtime
from dfclip.errors import UserError
from dfclip.runtime import Rank, resolve_device, tf32_precision


@pytest.fixture
def gpus(monkeypatch):
    """torch sees `n` CUDA GPUs (set gpus(n)) without any being here."""
    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.version, "cuda", "13.0")
    return see


def test_cuda_and_auto_take_this_ranks_gpu_under_torchrun(gpus):
    gpus(4)
    for device in ("auto", "cuda"):
        assert resolve_device(device, Rank(rank=6, world=8, local=2, local_world=4)) == torch.device("cuda", 2)
    assert resolve_device("cuda:3", Rank(local=1, local_world=4)) == torch.device("cuda", 3)
    assert resolve_device("cpu", Rank(local=1, local_world=4)) == torch.device("cpu")
    with pytest.raises(UserError, match="GPU 5 does not exist"):
        resolve_device("cuda:5", Rank())


def test_a_driver_torch_cannot_use_is_an_error_not_a_cpu_run(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "550.54.15")
    for device in ("auto", "cuda"):
        with pytest.raises(UserError) as err:
            resolve_device(device, Rank())
        message = str(err.value)
        assert "550.54.15" in message and "driver" in message and "--device cpu" in message
    assert resolve_device("cpu", Rank()) == torch.device("cpu")


def test_auto_is_the_cpu_only_without_any_nvidia_driver(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: None)
    assert resolve_device("auto", Rank()) == torch.device("cpu")
    with pytest.raises(UserError, match="no NVIDIA driver"):
        resolve_device("cuda", Rank())


def test_nvidia_driver_version_reads_the_kernel_module_line(tmp_path, monkeypatch):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                       "(dvs-builder@U16-I3-A16-1-1)  Sun Jul 27 06:54:38 UTC 2025\nGCC version:  gcc 12\n")
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", version)
    assert runtime.nvidia_driver_version() == "580.65.06"
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", tmp_path / "absent")
    assert runtime.nvidia_driver_version() is None


# --- TF32 ----------------------------------------------------------------------------------


@pytest.fixture
def no_legacy_tf32(monkeypatch):
    """Reading or writing the legacy allow_tf32 flags fails the test (it raises on torch 2.14 once
    the fp32_precision API has been used)."""
    def refuse(*args):
        pytest.fail("the legacy allow_tf32 API was used")

    for name in ("_get_cublas_allow_tf32", "_set_cublas_allow_tf32"):
        monkeypatch.setattr(torch._C, name, refuse)
    monkeypatch.setattr(type(torch.backends.cudnn), "allow_tf32", property(refuse, refuse))


def _precisions() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_tf32_precision_sets_the_new_api_and_restores_it(no_legacy_tf32):
    before = _precisions()
    with tf32_precision():
        assert _precisions() == ("tf32", "tf32")
    assert _precisions() == before
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with tf32_precision():
                raise RuntimeError("inside")
        assert _precisions()[0] == "ieee"  # restored after an error too
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]


def test_fit_evaluate_and_predict_score_at_the_same_precision(tmp_path, monkeypatch, no_legacy_tf32):
    """Thresholds are picked on val scores computed under TF32, so predict and evaluate score under TF32 too."""
    from dfclip.heads import run as R
    from dfclip.heads import train as T
    from dfclip.heads.config import make_config
    from dfclip.store.synthetic import make_synthetic_store

    seen: dict[str, set] = {}
    where = ["fit"]
    real = T.predict_logits

    def spy(*args, **kwargs):
        seen.setdefault(where[0], set()).add(_precisions()[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "predict_logits", spy)
    monkeypatch.setattr(R, "predict_logits", spy)
    s = make_synthetic_store(tmp_path / "s", n=300, dim=8, signal=4, fake_rate=0.5, seed=0)
    before = _precisions()
    run_dir = R.fit(s, make_config(epochs=1, batch_size=32, hidden=8, depth=1), runs_dir=tmp_path / "runs",
                    device="cpu", log=lambda line: None)
    where[0] = "evaluate"
    R.evaluate_run(run_dir, s, device="cpu")
    where[0] = "predict"
    R.predict_store(run_dir, s, device="cpu")
    assert seen == {"fit": {"tf32"}, "evaluate": {"tf32"}, "predict": {"tf32"}}
    assert _precisions() == before


# --- extraction precision, the sweep's barrier ----------------------------------------------------


def test_extraction_defaults_to_fp16_autocast_on_cuda_and_fp32_elsewhere():
    from dfclip.embed.extract import resolve_precision

    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_sweep_ranks_wait_at_the_barrier_for_as_long_as_a_sweep_takes(tmp_path, monkeypatch):
    """gloo's default 30-minute timeout would kill a rank that finished its slice early."""
    from dfclip.heads import run as R

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    R.sweep("unused-store", [], runs_dir=tmp_path, name="s")  # rank 1 of 2 with no configs: init, barrier, return
    assert calls == [("gloo", {"timeout": R.BARRIER_TIMEOUT})]
    assert R.BARRIER_TIMEOUT >= datetime.timedelta(days=1)
