"""The CUDA code paths, run on a CPU: training (heads.train.train) and the extraction batch
loop (embed.extract._embed_all) with every device tensor claiming to live on cuda:0.

The harness ("fake CUDA"):
- `FakeCudaTensor` is a CPU tensor whose `.device` says cuda:0 (`is_cuda` True). Its maths is
  real CPU maths, so a fake-CUDA fit can be compared with a CPU fit number for number.
- `ClaimCuda`, a TorchFunctionMode, turns every request for a CUDA tensor (`device="cuda"`
  of a factory, `.to("cuda")`, `.cuda()`, `Module.to`) into a FakeCudaTensor.
- Every torch call that sees a FakeCudaTensor is checked: a CPU tensor of one or more
  dimensions in the same call (or a CPU generator for a CUDA draw, or the reverse) fails with
  DeviceMismatch, as on a GPU; `.numpy()` of a CUDA tensor fails as on a GPU.
- Inside a training step (the body of the trainer's `for idx in batches:` loop, found by
  wrapping heads.train.epoch_batches), every host sync fails with HostSync: `.item()`,
  `.tolist()`, `bool()/int()/float()` of a tensor, `.cpu()`/`.to("cpu")`/`.numpy()`, any
  copy between host and device (either way, blocking or not: no host tensor is pinned
  here), and the ops whose output size depends on the data (nonzero, masked_select, unique,
  boolean-mask indexing). Syncs outside the step (per-epoch validation, logging) are allowed.
- `torch.Generator("cuda")` needs a driver, so the test replaces torch.Generator with a
  subclass that makes a CPU generator claiming the requested device; draws check that claim.
- A non-blocking device-to-host copy returns a tensor that cannot be read until a
  torch.cuda.Event recorded after the copy has been synchronized (torch.cuda.Event is faked).

Limits (what this cannot see):
- Everything really runs on the CPU: no CUDA kernel, stream, allocator or autocast runs.
  fp16/bf16 autocast on "cuda" has no effect here, so precision is not checked.
- Syncs inside torch's own C++ kernels are invisible; the checks see torch calls made from
  Python (the whole of dfclip's code). A C++ op that syncs on a GPU without having a Python
  name in the list below (e.g. a data-dependent op not listed) would pass.
- Streams and events are not modelled beyond "read a non-blocking copy only after an event
  recorded after it was synchronized".
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)


class DeviceMismatch(AssertionError):
    """Tensors (or a generator) of two devices met in one call: an error on a real GPU."""


class HostSync(AssertionError):
    """A host-device synchronisation inside a training step."""


@dataclasses.dataclass
class HarnessState:
    in_step: bool = False
    steps: int = 0
    syncs: list = dataclasses.field(default_factory=list)


STATE = HarnessState()


def _sync(what: str) -> None:
    if STATE.in_step:
        STATE.syncs.append(what)
        raise HostSync(f"host sync where none is allowed (a training step): {what}")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # torch reads a bare int as a CUDA ordinal
        return True
    return torch.device(device).type == "cuda"


def _getter(name: str):
    return getattr(torch.Tensor, name).__get__


DEVICE_GET, IS_CUDA_GET, IS_CPU_GET = _getter("device"), _getter("is_cuda"), _getter("is_cpu")

SCALAR_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
                torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.__repr__}
DATA_DEPENDENT_SHAPES = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                         torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive,
                         torch.argwhere, torch.Tensor.argwhere, torch.equal, torch.Tensor.equal,
                         torch.allclose, torch.Tensor.allclose, torch.bincount, torch.Tensor.bincount,
                         torch.repeat_interleave, torch.Tensor.repeat_interleave}


def _as_fake(t):
    return t.as_subclass(FakeCudaTensor) if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) else t


def _as_host(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor.clone(t).as_subclass(torch.Tensor) if isinstance(t, FakeCudaTensor) else t


def _devices(func, args, kwargs) -> set[str]:
    """Device types in a call: CUDA for fake tensors, cpu for host tensors of >= 1 dims.

    0-dim host tensors mix with CUDA ones on a GPU too (they are passed as scalars)."""
    found = set()
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, FakeCudaTensor):
            found.add("cuda")
        elif isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            found.add("cpu")
    return found


def _check_generator(func, kwargs, device_type: str) -> None:
    g = kwargs.get("generator")
    if g is not None and g.device.type != device_type:
        raise DeviceMismatch(f"{func.__name__}: a {g.device.type} generator for a {device_type} draw")


def _bool_mask_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    leaves = tree_flatten(index)[0]
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in leaves)


def _to_target(args, kwargs):
    """(device, non_blocking) of a Tensor.to call."""
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    return device, non_blocking


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0, with the checks of the module docstring."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func == DEVICE_GET:
            return CUDA
        if func == IS_CUDA_GET:
            return True
        if func == IS_CPU_GET:
            return False
        if func is torch.Tensor.get_device:
            return 0
        if func in torch.overrides.get_default_nowrap_functions():  # .grad, ._base: torch leaves them unwrapped
            return _as_fake(super().__torch_function__(func, types, args, kwargs))
        if func is torch._has_compatible_shallow_copy_type:  # nn.Module._apply asks; CPU and CUDA are not
            return all(isinstance(a, FakeCudaTensor) for a in args)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is torch.Tensor.cuda:
            return args[0]
        if func in (torch.Tensor.cpu, torch.Tensor.to) and not isinstance(args[0], FakeCudaTensor):
            return super().__torch_function__(func, types, args, kwargs)  # a host tensor as an argument
        if func is torch.Tensor.cpu:
            _sync("Tensor.cpu()")
            return _as_host(args[0])
        if func is torch.Tensor.to:
            device, non_blocking = _to_target(args, kwargs)
            if device is not None and device.type == "cpu":
                _sync(f"Tensor.to(cpu, non_blocking={non_blocking})")
                out = _as_host(args[0].to(**{k: v for k, v in kwargs.items() if k == "dtype"}))
                return HostCopy.pending(out) if non_blocking else out
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            args = tuple(a for a in args if not (isinstance(a, (str, torch.device, int)) and _is_cuda(a)))
            return super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if isinstance(dst, FakeCudaTensor) != isinstance(src, FakeCudaTensor):
                _sync(f"copy_ between host and device (non_blocking={kwargs.get('non_blocking', False)})")
                with torch._C.DisableTorchFunctionSubclass():
                    torch.Tensor.copy_(dst, src)
                return dst
        if func in SCALAR_READS:
            _sync(f"Tensor.{name}")
        elif func in DATA_DEPENDENT_SHAPES:
            _sync(f"{name} (output size depends on the data)")
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_mask_index(args):
            _sync(f"{name} with a boolean mask")
        if _devices(func, args, kwargs) == {"cuda", "cpu"}:
            raise DeviceMismatch(f"{name} mixes cuda:0 and cpu tensors")
        _check_generator(func, kwargs, "cuda")
        return super().__torch_function__(func, types, args, kwargs)


class HostCopy(torch.Tensor):
    """The host side of a non-blocking device-to-host copy: unreadable until an event recorded
    after the copy has been synchronized (FakeEvent)."""

    ready: bool

    @classmethod
    def pending(cls, t: torch.Tensor) -> "HostCopy":
        out = t.as_subclass(cls)
        out.ready = False
        PENDING.append(out)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for leaf in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(leaf, HostCopy) and not leaf.ready:
                raise HostSync(f"{getattr(func, '__name__', func)} read a non-blocking device-to-host copy "
                               "before any event recorded after it was synchronized")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, HostCopy) else t, out)


PENDING: list[HostCopy] = []


class FakeEvent:
    """torch.cuda.Event without a driver: synchronize() completes the copies issued before record()."""

    def __init__(self, *args, **kwargs) -> None:
        self.covers: list[HostCopy] = []

    def record(self, stream=None) -> None:
        self.covers = list(PENDING)

    def synchronize(self) -> None:
        for copy in self.covers:
            copy.ready = True
        PENDING[:] = [c for c in PENDING if not c.ready]

    def query(self) -> bool:
        return True


class ClaimCuda(TorchFunctionMode):
    """Every torch call asking for a CUDA device gets a FakeCudaTensor instead of a driver error."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if func is torch._C._nn._parse_to:  # Module.to's argument parser: a device name, not a tensor
            return func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and not isinstance(args[0], FakeCudaTensor):
            device, non_blocking = _to_target(args, kwargs) if func is torch.Tensor.to else (CUDA, False)
            if device is not None and device.type == "cuda":
                _sync(f"host-to-device copy (non_blocking={non_blocking}, from pageable memory)")
                rest = {k: v for k, v in kwargs.items() if k in ("dtype", "memory_format")}
                return _as_fake(torch.Tensor.to(args[0], copy=True, **rest))
            return func(*args, **kwargs)
        if _is_cuda(kwargs.get("device")):
            _check_generator(func, kwargs, "cuda")
            tensors_in = any(isinstance(a, torch.Tensor) for a in tree_flatten(args)[0])
            if tensors_in and not all(isinstance(a, FakeCudaTensor) for a in tree_flatten(args)[0]
                                      if isinstance(a, torch.Tensor)):
                _sync(f"{name}(host tensor, device=cuda): a host-to-device copy")
            elif not tensors_in and func in (torch.tensor, torch.as_tensor, torch.asarray):
                _sync(f"{name}(host data, device=cuda): a blocking host-to-device copy")
            kwargs["device"] = "cpu"
            return tree_map(_as_fake, func(*args, **kwargs))
        if not any(isinstance(a, FakeCudaTensor) for a in tree_flatten((args, kwargs))[0]):
            _check_generator(func, kwargs, "cpu")
        return func(*args, **kwargs)


class HarnessGenerator(torch.Generator):
    """A CPU generator that claims the device it was asked for (torch.Generator("cuda") needs a driver)."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls, "cpu")
        g.claimed = torch.device("cuda", 0) if _is_cuda(device) else torch.device(device)
        return g

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self) -> torch.device:
        return self.claimed


@pytest.fixture
def fake_cuda(monkeypatch):
    """Run the test body with the harness on (see the module docstring)."""
    monkeypatch.setattr(torch, "Generator", HarnessGenerator)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to then yields FakeCudaTensor params
    STATE.in_step, STATE.steps, STATE.syncs = False, 0, []
    PENDING.clear()
    try:
        with ClaimCuda():
            yield STATE
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


# --- the harness itself catches what it claims to ------------------------------------------


def test_harness_catches_device_mixing_and_syncs(fake_cuda):
    x = torch.randn(4, 3, device="cuda")
    assert x.device == CUDA and x.is_cuda and isinstance(x * 2, FakeCudaTensor)
    with pytest.raises(DeviceMismatch):
        x + torch.ones(4, 3)
    with pytest.raises(DeviceMismatch):
        torch.rand(3, device="cuda", generator=torch.Generator("cpu"))
    with pytest.raises(DeviceMismatch):
        torch.rand(3, generator=torch.Generator("cuda"))
    assert (x + torch.tensor(1.0)).device == CUDA  # a 0-dim host tensor is a scalar, as on a GPU
    with pytest.raises(TypeError):
        x.numpy()
    assert x.sum().item() == pytest.approx(float(x.cpu().sum()))  # outside a step: allowed
    STATE.in_step = True
    try:
        for sync in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum() > 0), lambda: x.cpu(),
                     lambda: x.to("cpu", non_blocking=True), lambda: torch.ones(3).to("cuda"),
                     lambda: torch.tensor([1.0], device="cuda"), lambda: x[x > 0], lambda: x.nonzero(),
                     lambda: float(x[0, 0]), lambda: repr(x)):
            with pytest.raises(HostSync):
                sync()
        y = torch.zeros(3, device="cuda") + x[0]  # no sync: stays on the device
        assert y.device == CUDA
    finally:
        STATE.in_step = False


# --- training ------------------------------------------------------------------------------


class StepScoped:
    """An epoch's batches whose iteration marks the trainer's loop body as "in a step"."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]

    def __iter__(self):
        try:
            for idx in self.batches:
                STATE.in_step = True
                STATE.steps += 1
                yield idx
                STATE.in_step = False
        finally:
            STATE.in_step = False


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from dfclip.store.synthetic import make_synthetic_store

    return make_synthetic_store(tmp_path_factory.mktemp("cuda") / "s", n=600, dim=16, signal=4, fake_rate=0.7,
                                seed=3)


def _train(store_dir, cfgs, device, monkeypatch=None):
    from dfclip.heads import train as T
    from dfclip.heads.data import load_data

    data = load_data(store_dir, cfgs[0], device=torch.device(device))
    results, _ = T.train(data, cfgs, log=lambda line: None)
    return data, results


FIT = dict(epochs=2, lr=1e-2, batch_size=64, hidden=16, depth=2, cuda_graphs="off")

CASES = {
    "fit": [dict()],
    "sweep-k8-sam": [dict(sam_rho=r, cvar_alpha=a, seed=s) for r in (0.0, 0.05) for a in (0.5, 1.0) for s in (0, 1)],
    "balanced-vs-noise": [dict(balanced=True, fake_rate=0.5, loss="vs", auc_gamma=0.5, feature_noise=True)],
    "linear-asam-l2": [dict(head="linear", sam_rho=0.05, sam_adaptive=True, l2_normalize=True, patience=1,
                            select="loss")],
}


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("case", CASES)
def test_training_on_fake_cuda_mixes_no_devices_and_never_syncs_in_a_step(fake_cuda, monkeypatch, small_store, case,
                                                                           graphed):
    """Eager steps, and graph-captured ones (--cuda-graphs on, capture and replay emulated by
    tests/graph_emulation.py: warm-up steps, the capture and every replay run inside the step)."""
    from dfclip.heads import graphs
    from dfclip.heads import train as T
    from dfclip.heads.config import make_config

    from graph_emulation import EmulatedBackend

    real_batches = T.epoch_batches
    monkeypatch.setattr(T, "epoch_batches", lambda *a, **kw: StepScoped(real_batches(*a, **kw)))
    backend = EmulatedBackend()
    monkeypatch.setattr(graphs, "BACKEND", backend)
    cfgs = [make_config(**(FIT | over | ({"cuda_graphs": "on"} if graphed else {}))) for over in CASES[case]]
    data, results = _train(small_store, cfgs, "cuda")
    assert data.x.device == CUDA and data.val.x.device == CUDA
    assert fake_cuda.steps > 0, "the step hook saw no step: heads.train no longer loops over epoch_batches"
    assert fake_cuda.syncs == []
    assert (backend.replays > 0) == graphed
    for r in results:
        assert {n: t.device for n, t in r.head.state_dict().items()} == {n: CUDA for n in r.head.state_dict()}
        assert 0.0 <= r.reports["val"]["auc"] <= 1.0



def test_a_fake_cuda_fit_is_the_cpu_fit(fake_cuda, small_store):
    """The harness changes no maths: same batches, same noise, same weights as on the CPU."""
    from dfclip.heads.config import make_config

    # fp32: autocast has no effect under the harness (see Limits), while a CPU with native bf16 would use it.
    cfg = make_config(**FIT, feature_noise=True, precision="fp32")
    _, (on_cuda,) = _train(small_store, [cfg], "cuda")
    _, (on_cpu,) = _train(small_store, [cfg], "cpu")
    assert on_cuda.history.drop("seconds").equals(on_cpu.history.drop("seconds"))
    assert on_cuda.reports == on_cpu.reports
    for name, t in on_cpu.head.state_dict().items():
        assert torch.equal(on_cuda.head.state_dict()[name].cpu(), t)


@pytest.mark.parametrize("sync", ["item", "cpu_tensor"])
def test_the_step_check_catches_a_sync_or_a_host_tensor_in_the_loss(fake_cuda, monkeypatch, small_store, sync):
    from dfclip.heads import losses
    from dfclip.heads import train as T
    from dfclip.heads.config import make_config

    real_batches, real_call = T.epoch_batches, losses.Objective.__call__
    monkeypatch.setattr(T, "epoch_batches", lambda *a, **kw: StepScoped(real_batches(*a, **kw)))

    def bad_loss(self, logits, labels):
        loss = real_call(self, logits, labels)
        if sync == "item":
            print(f"loss {loss.sum().item()}")
            return loss
        return loss + torch.zeros(loss.shape)  # a host tensor of the loss's shape

    monkeypatch.setattr(losses.Objective, "__call__", bad_loss)
    with pytest.raises(HostSync if sync == "item" else DeviceMismatch):
        _train(small_store, [make_config(**FIT)], "cuda")


# --- extraction ------------------------------------------------------------------------------


class RecordingWriter:
    """What _embed_all hands to store.ShardWriter: feature rows by path, and failures."""

    def __init__(self) -> None:
        self.rows: dict[str, np.ndarray] = {}
        self.failures: list[str] = []

    def add(self, features: np.ndarray, cols: dict, blocks: np.ndarray | None = None) -> None:
        assert isinstance(features, np.ndarray) and features.dtype == np.float32
        assert blocks is None or isinstance(blocks, np.ndarray)  # host arrays only, like the features
        self.rows.update(zip(cols["path"], features))

    def add_failure(self, path, size, mtime_ns, kind, message) -> None:
        self.failures.append(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("cuda_images")
    rng = np.random.default_rng(0)
    for i in range(7):
        size = (40 + 9 * i, 32 + 5 * i)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def _extract_rows(folder, checkpoint, device: str, precision: str) -> RecordingWriter:
    E = importlib.import_module("dfclip.embed.extract")  # dfclip.embed.extract is also a function
    from dfclip.embed.backbone import load_backbone, split_preprocess

    backbone = load_backbone("dfclip-tiny", str(checkpoint), device=device)
    todo, root = E._load_rows(folder, None, None, None, "fake")
    host, on_device = split_preprocess(backbone.preprocess)
    loader = E.make_loader(E.ImageFiles(root, todo["path"].to_list(), host), batch_size=3, workers=0,
                           pin_memory=False)
    writer = RecordingWriter()
    E._embed_all(loader, backbone, precision, writer, todo, lambda n: None, on_device=on_device)
    return writer


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_the_extraction_loop_on_fake_cuda(fake_cuda, image_folder, tiny_checkpoint, precision):
    """Every batch stays on the device until its non-blocking copy home, which is read only
    after its event was synchronized; rows match a CPU run (autocast is a no-op here: see Limits)."""
    on_cuda = _extract_rows(image_folder, tiny_checkpoint, "cuda", precision)
    on_cpu = _extract_rows(image_folder, tiny_checkpoint, "cpu", "fp32")
    assert PENDING == [], "a device-to-host copy was never waited for"
    assert on_cuda.failures == on_cpu.failures == ["broken.png"]
    assert sorted(on_cuda.rows) == sorted(on_cpu.rows) and len(on_cpu.rows) == 7
    for path, features in on_cpu.rows.items():
        np.testing.assert_allclose(on_cuda.rows[path], features, rtol=1e-5, atol=1e-6)


def test_device_preprocess_copies_mean_and_std_to_the_device_once(fake_cuda):
    from dfclip.embed.backbone import DevicePreprocess

    normalize = DevicePreprocess((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8).to("cuda")
    first = normalize(pixels)
    STATE.in_step = True  # from the second batch on: no host-to-device copy at all (HostSync otherwise)
    try:
        second = normalize(pixels)
    finally:
        STATE.in_step = False
    assert first.device == second.device == CUDA and torch.equal(first, second)
    assert all(t.device == CUDA for t in normalize.constants(CUDA))
    expected = (pixels.cpu().permute(0, 3, 1, 2) / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(second.cpu(), expected)
