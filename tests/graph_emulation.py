"""A CPU stand-in for torch.cuda's graph capture and replay, for heads.graphs.BACKEND in tests.

A capture runs the step function once and records every aten op it issues (through a
TorchDispatchMode: forward, autograd's backward, the optimizer) with the very tensors it read
and wrote. A replay re-runs that list of ops and nothing else: no Python of the step function
runs, exactly as a CUDA graph replays kernels on fixed buffers. So a fit with the emulated
graphs trains like the eager fit only if every per-step input is in a device buffer, and the
step has no Python-side state or branch that should have changed between steps.

Also checked, as errors in the step:
- host reads (`.item()`, `bool()`, `.tolist()`: aten's _local_scalar_dense) and ops whose output
  size depends on the data (nonzero, masked_select, unique, boolean-mask indexing);
- static shapes: the capture issues the same ops on the same shapes as the warm-up step before it
  (the first warm-up step may differ: autograd allocates the gradients there, as on a GPU).

Limits: the emulation re-runs CPU kernels; a CUDA-only capture problem (an op that syncs inside
its kernel, the caching allocator, stream rules) is not seen. tests/test_cuda_graphs.py's
CUDA-only test covers those on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.argwhere.default}


class CaptureUnsafe(AssertionError):
    """The step does something a CUDA graph cannot replay."""


def _signature(func, args, kwargs) -> tuple:
    return (str(func),) + tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
                                for t in tree_flatten((args, kwargs))[0])


class Recorder(TorchDispatchMode):
    """Records (op, args, kwargs, outputs) of every aten op; raises CaptureUnsafe on host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.signatures: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise CaptureUnsafe(f"host read in the step: {func}")
        if func in DATA_SHAPED:
            raise CaptureUnsafe(f"output size depends on the data: {func}")
        if func is aten.index.Tensor and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                             for t in tree_flatten(args[1:])[0]):
            raise CaptureUnsafe("boolean-mask indexing in the step")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        self.signatures.append(_signature(func, args, kwargs))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Recording:
    """A captured step: its op list, replayed on the recorded tensors."""

    def __init__(self, ops: list[tuple]) -> None:
        self.ops = ops
        self.fresh = True  # the capture itself ran the step: its first replay is that run

    def replay(self) -> None:
        if self.fresh:
            self.fresh = False
            return
        plain = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731  (kernels only, no autograd)
        # kernels only: no autograd, and no torch-function layer (a replay runs no Python of the step)
        with torch.no_grad(), torch._C.DisableTorchFunction():
            for func, args, kwargs, out in self.ops:
                new = func(*tree_map(plain, args), **tree_map(plain, kwargs))
                for old, now in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                    # a fresh output goes into the recorded one (later ops read it); views and in-place
                    # outputs already live in the recorded storage
                    if isinstance(old, torch.Tensor) and _storage(now) != _storage(old):
                        old.detach().copy_(now)


class EmulatedBackend:
    """heads.graphs' backend interface on any device; counts captures and replays."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.warmups, self.captures, self.replays = 0, 0, 0
        self.signatures: list[tuple[str, list[tuple]]] = []  # ("warmup" or "capture", op signatures) per call

    def applies(self, device: torch.device) -> bool:
        return True

    def problem(self) -> str | None:
        return None

    def pool(self):
        return None

    def warmup(self, fn) -> None:
        with Recorder() as rec:
            fn()
        self.signatures.append(("warmup", rec.signatures))
        self.warmups += 1

    def capture(self, fn, generators, pool) -> Recording:
        if self.fail is not None:
            raise self.fail
        with Recorder() as rec:
            fn()
        self.signatures.append(("capture", rec.signatures))
        self.captures += 1
        return Recording(rec.ops)

    def replay(self, graph: Recording) -> None:
        self.replays += 1
        graph.replay()

    def static_shapes(self) -> bool:
        """Whether each capture issued the ops of the warm-up step just before it, on the same shapes."""
        return all(kind == "warmup" and sig == self.signatures[i + 1][1]
                   for i, (kind, sig) in enumerate(self.signatures[:-1]) if self.signatures[i + 1][0] == "capture")
