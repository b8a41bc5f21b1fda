"""Optimizers for K heads trained at once: AdamW with per-model lr / weight decay, and SAM.

Every parameter has a leading model dimension K; model k's slice sees only its own
gradient, so these behave exactly like K independent optimizers, one per head, without
a Python loop over layers. Per-model hyperparameters are floats or [K] tensors. The
steps never wait for the device (a per-model lr_scale given as a device tensor is the one exception,
unless the step is taken with on_device=True: then nothing leaves the device and the step can be
captured in a CUDA graph, see heads/graphs.py).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

# With K > 1 the parameters are strided views of a [K, P] buffer (_FlatGroup) and so are their
# gradients; autograd then warns once that the gradient is not contiguous. That layout is on
# purpose (backward accumulates straight into the optimizer's buffer), so the note is noise.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def _model_count(params: list[Tensor]) -> int:
    """The shared leading dim K of `params`; ValueError if they disagree."""
    if not params:
        raise ValueError("optimizer got no parameters")
    sizes = {p.shape[0] if p.ndim else None for p in params}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"all parameters need the same leading model dim K, got {sizes}")
    return sizes.pop()


def _per_model(value: float | Tensor, k: int, like: Tensor) -> Tensor:
    """A float or [K] hyperparameter as a [K] tensor on `like`'s device and dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.numel() not in (1, k):
        raise ValueError(f"per-model hyperparameter has {value.numel()} values for K={k} models")
    return value.expand(k).clone() if value.numel() == 1 else value.reshape(k).clone()


def _along_dim0(per_model: Tensor, p: Tensor) -> Tensor:
    """View a [K] tensor as [K, 1, 1, ...] so it broadcasts over the rest of `p`."""
    return per_model.to(p.dtype).view(-1, *([1] * (p.ndim - 1)))


def _rows_by_hparams(hparams: list[tuple[float, float]]) -> dict[tuple[float, float], list[int]]:
    """The models (rows) of each distinct (lr, weight decay), in first-seen order."""
    out: dict[tuple[float, float], list[int]] = {}
    for row, key in enumerate(hparams):
        out.setdefault(key, []).append(row)
    return out


def _adjacent(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [first, end) runs of adjacent rows: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


class _FlatGroup:
    """One param group's parameters as views into ONE [K, P] buffer, and its gradients likewise.

    Row k holds model k's P numbers (every parameter's slice k, flattened, one after another),
    so an update of all parameters is a few ops on [K, P] with per-model scalars as [K, 1]
    columns, however many layers the head has. The parameters become views of `params`
    (their values unchanged); `grads` is the gradient buffer, whose views are bound as .grad
    so that backward accumulates into it in place.
    """

    def __init__(self, params: list[Tensor]):
        self.k = _model_count(params)
        sizes = [p[0].numel() for p in params]
        self.bounds = list(zip(itertools.accumulate([0] + sizes[:-1]), itertools.accumulate(sizes)))
        with torch.no_grad():
            self.params = torch.cat([p.detach().reshape(self.k, -1) for p in params], dim=1)
        self.grads = torch.zeros_like(self.params)
        for p, view in zip(params, self.views(self.params, params)):
            p.data = view  # same values, now stored in row k of the flat buffer
        self.grad_views = self.views(self.grads, params)
        self.host_hparams: list[tuple[float, float]] = []  # (lr, weight decay) per model, set by the optimizer
        self.step_tensor: Tensor | None = None  # the step count the fused kernel reads
        self.step_value = -1

    def views(self, flat: Tensor, like: list[Tensor]) -> list[Tensor]:
        """Per-parameter views [K, ...] of a [K, P] buffer."""
        return [flat[:, a:b].view_as(p) for (a, b), p in zip(self.bounds, like)]

    def gather_grads(self, params: list[Tensor]) -> list[bool]:
        """Make every gradient a view of `grads`; returns which parameters have one.

        After zero_grad(set_to_none=False) backward already wrote into the buffer (no work
        here); a gradient assigned from outside or made after set_to_none is copied in once.
        A parameter without a gradient gets zeros in the buffer (and False here).
        """
        has = []
        for p, view in zip(params, self.grad_views):
            has.append(p.grad is not None)
            if p.grad is view:
                continue
            with torch.no_grad():
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                    p.grad = view
        return has


class BatchedAdamW(torch.optim.Optimizer):
    """AdamW (same maths as torch.optim.AdamW, amsgrad off) with per-model lr and weight decay.

    lr and weight_decay are floats or [K] tensors, applied along dim 0 of every parameter.
    `step(lr_scale)` multiplies every lr by the schedule factor the trainer computes
    (warmup / cosine); weight decay is decoupled and scaled by the scheduled lr, as in torch.

    Lean steps: each param group keeps its parameters, gradients and both moments in [K, P]
    buffers (_FlatGroup; the parameters become views into it). A step is one call of torch's
    fused AdamW kernel (the one torch.optim.AdamW(fused=True) runs: one pass over the buffers)
    per distinct (lr, weight decay) among the K models, each on those models' rows, whatever
    the number of layers; zero_grad is one op. The per-model lr and weight decay are kept as
    host floats too, so a step never reads them back from the device. zero_grad() zeroes the
    gradient buffer in place by default (set_to_none=False, unlike torch): backward then
    accumulates into it and no gradient is copied. Parameters must not be re-created (e.g. by
    module.to()) after this.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | Tensor = 1e-2,
    ):
        self.flat: list[_FlatGroup] = []  # one per param group, filled by add_param_group
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim API), storing its lr and weight decay as [K] tensors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        k = _model_count(group["params"])
        for key in ("lr", "weight_decay"):
            group[key] = _per_model(group[key], k, group["params"][0])
        flat = _FlatGroup(group["params"])
        flat.host_hparams = list(zip(group["lr"].tolist(), group["weight_decay"].tolist()))
        self.flat.append(flat)
        self._bind_state(group, flat, torch.zeros_like(flat.params), torch.zeros_like(flat.params), [0] * len(flat.bounds))

    def _bind_state(self, group: dict, flat: _FlatGroup, exp_avg: Tensor, exp_avg_sq: Tensor, steps: list[int]) -> None:
        """Per-parameter state (torch's state_dict layout) as views of the [K, P] moments."""
        flat.exp_avg, flat.exp_avg_sq = exp_avg, exp_avg_sq
        params = group["params"]
        for p, m, v, n in zip(params, flat.views(exp_avg, params), flat.views(exp_avg_sq, params), steps):
            # step: a Python int, so bias corrections need no device read
            self.state[p] = {"step": n, "exp_avg": m, "exp_avg_sq": v}

    @torch.no_grad()
    def step(self, lr_scale: float | Sequence[float] | Tensor = 1.0, on_device: bool = False) -> None:
        """One AdamW update of every parameter that has a gradient, lr multiplied by lr_scale:
        one float, or one per model (a list, or a [K] tensor, which is read to the host).

        on_device=True: lr_scale is a 0-dim or [K] tensor on the parameters' device and the step
        never reads the host: see device_step."""
        if on_device:
            self.device_step(lr_scale)
            return
        for group, flat in zip(self.param_groups, self.flat):
            has_grad = flat.gather_grads(group["params"])
            for p in (p for p, has in zip(group["params"], has_grad) if has):
                self.state[p]["step"] += 1
            # Consecutive parameters with gradients and one step count update as one slice of [K, P]
            # (all of them, in training; torch skips a parameter without a gradient, so do we).
            for (a, b), step in self._runs(group, flat, has_grad):
                self._update(group, flat, slice(a, b), step, lr_scale)

    def _runs(self, group: dict, flat: _FlatGroup, has_grad: list[bool]) -> list[tuple[tuple[int, int], int]]:
        """((first, end) columns, step count) of each run of adjacent parameters with a gradient and one step."""
        runs: list[tuple[tuple[int, int], int]] = []
        for p, (a, b), has in zip(group["params"], flat.bounds, has_grad):
            step = self.state[p]["step"]
            if has and runs and runs[-1][0][1] == a and runs[-1][1] == step:
                runs[-1] = ((runs[-1][0][0], b), step)
            elif has:
                runs.append(((a, b), step))
        return runs

    def _update(self, group: dict, flat: _FlatGroup, cols: slice, step: int,
                lr_scale: float | Sequence[float] | Tensor) -> None:
        """torch.optim.AdamW's update on columns `cols` of the [K, P] buffers: torch's fused kernel,
        one call per distinct (scheduled lr, weight decay), on the rows of the models that have it."""
        beta1, beta2 = group["betas"]
        k = flat.k
        scales = lr_scale.tolist() if isinstance(lr_scale, Tensor) else lr_scale
        scales = [float(scales)] * k if isinstance(scales, (int, float)) else [float(s) for s in scales]
        if len(scales) != k:
            raise ValueError(f"lr_scale has {len(scales)} values for K={k} models")
        rows_of: dict[tuple[float, float], list[int]] = {}
        for row, ((lr, wd), scale) in enumerate(zip(flat.host_hparams, scales)):
            rows_of.setdefault((lr * scale, wd), []).append(row)
        if flat.step_tensor is None or flat.step_value != step:  # the kernel reads the step from a tensor
            if flat.step_tensor is None:
                flat.step_tensor = torch.zeros((), dtype=torch.float32, device=flat.params.device)
            flat.step_tensor.fill_(step)  # an op on the device, not a host-to-device copy
            flat.step_value = step
        whole = cols.start == 0 and cols.stop == flat.params.shape[1]
        for (lr, wd), rows in rows_of.items():
            # Adjacent rows go as one block when the columns span the row (a contiguous [rows, P] view).
            blocks = _adjacent(rows) if whole else [(r, r + 1) for r in rows]

            def pick(t: Tensor) -> list[Tensor]:
                return [t[a:b] if whole else t[a, cols] for a, b in blocks]
            torch._fused_adamw_(pick(flat.params), pick(flat.grads), pick(flat.exp_avg), pick(flat.exp_avg_sq), [],
                                [flat.step_tensor] * len(blocks), lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                                eps=group["eps"], amsgrad=False, maximize=False)

    def begin_device_steps(self) -> None:
        """Set each group's device step counter to its step count, before device_step is used.

        Every parameter of a group must have the same step count (true in training, where each
        step updates them all)."""
        for group, flat in zip(self.param_groups, self.flat):
            steps = {self.state[p]["step"] for p in group["params"]}
            if len(steps) != 1:
                raise ValueError(f"device steps need one step count per param group, got {sorted(steps)}")
            if flat.step_tensor is None:
                flat.step_tensor = torch.zeros((), dtype=torch.float32, device=flat.params.device)
            flat.step_tensor.fill_(steps.pop())
            flat.step_value = -1  # the eager path refills it before its next step

    def advance_host_steps(self, n: int = 1) -> None:
        """Count n device steps in the host step counts (state_dict, select), which device_step leaves alone."""
        for group, flat in zip(self.param_groups, self.flat):
            for p in group["params"]:
                self.state[p]["step"] += n
            flat.step_value = -1

    @torch.no_grad()
    def device_step(self, lr_scale: Tensor) -> None:
        """One AdamW update of every parameter, capture-safe: no host read, no allocation-dependent
        branch, the same ops on the same buffers every call.

        lr_scale: a 0-dim tensor (one schedule factor for all models) or [K] (one per model), on
        the device. The step count lives on the device (begin_device_steps sets it, this adds 1),
        so a replayed CUDA graph counts too; the host counts are the caller's (advance_host_steps).
        Each distinct (lr, weight decay) among the models is one fused-kernel call with a tensor lr:
        models with equal lr have equal scheduled lr under either schedule, so the grouping is static.
        """
        for group, flat in zip(self.param_groups, self.flat):
            # after the first step every gradient is a view of the flat buffer already (nothing runs)
            if not all(flat.gather_grads(group["params"])):
                raise ValueError("a device step needs a gradient for every parameter")
            flat.step_tensor.add_(1)
            beta1, beta2 = group["betas"]
            # float32 on CUDA (the fused kernel reads a float lr there); float64 elsewhere, as a host lr
            lr_dtype = torch.float32 if flat.params.device.type == "cuda" else torch.float64
            for (lr, wd), rows in _rows_by_hparams(flat.host_hparams).items():
                scale = lr_scale if lr_scale.dim() == 0 else lr_scale[rows[0]]
                blocks = _adjacent(rows)
                torch._fused_adamw_([flat.params[a:b] for a, b in blocks], [flat.grads[a:b] for a, b in blocks],
                                    [flat.exp_avg[a:b] for a, b in blocks], [flat.exp_avg_sq[a:b] for a, b in blocks],
                                    [], [flat.step_tensor] * len(blocks), lr=(scale * lr).to(lr_dtype),
                                    beta1=beta1, beta2=beta2, weight_decay=wd, eps=group["eps"], amsgrad=False,
                                    maximize=False)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in one op (they stay views of the flat buffer); set_to_none=True as torch."""
        with record_function("Optimizer.zero_grad#BatchedAdamW.zero_grad"):  # torch's name for this region
            self._zero_grad(set_to_none)

    def _zero_grad(self, set_to_none: bool) -> None:
        for group, flat in zip(self.param_groups, self.flat):
            if set_to_none:
                for p in group["params"]:
                    p.grad = None
            else:
                flat.grads.zero_()
                for p, view in zip(group["params"], flat.grad_views):
                    p.grad = view

    def flat_params_and_grads(self) -> list[tuple[Tensor, Tensor]]:
        """(parameters, gradients) [K, P] of every group, gradients gathered (for SAM)."""
        for group, flat in zip(self.param_groups, self.flat):
            flat.gather_grads(group["params"])
        return [(flat.params, flat.grads) for flat in self.flat]

    def select(self, indices: list[int], params: list[Tensor]) -> BatchedAdamW:
        """A BatchedAdamW for models `indices` only, over `params`: the rows `indices` of this
        optimizer's parameters (in order, e.g. head.select(indices).parameters()), with those rows'
        moments, step counts, lr and weight decay, so the kept models continue exactly as before
        (successive halving drops the others)."""
        old = [p for group in self.param_groups for p in group["params"]]
        if len(old) != len(params):
            raise ValueError(f"select needs one new parameter per old one: {len(old)} vs {len(params)}")
        rows = torch.as_tensor(indices, dtype=torch.long, device=old[0].device)
        groups, at = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**group, "params": params[at:at + n], "lr": group["lr"][rows],
                           "weight_decay": group["weight_decay"][rows]})
            at += n
        new = BatchedAdamW(groups)
        for group, flat, new_group, new_flat in zip(self.param_groups, self.flat, new.param_groups, new.flat):
            steps = [self.state[p]["step"] for p in group["params"]]
            new._bind_state(new_group, new_flat, flat.exp_avg[rows].clone(), flat.exp_avg_sq[rows].clone(), steps)
        return new

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, moving the per-model lr / weight decay to the parameters' device."""
        super().load_state_dict(state_dict)
        for group, flat in zip(self.param_groups, self.flat):
            params = group["params"]
            like = params[0]
            for key in ("lr", "weight_decay"):
                group[key] = torch.as_tensor(group[key]).to(device=like.device, dtype=like.dtype).clone()
            flat.host_hparams = list(zip(group["lr"].tolist(), group["weight_decay"].tolist()))
            # torch loads per-parameter tensors; copy them back into the [K, P] moments.
            states = [self.state[p] for p in params]
            moments = [torch.cat([s[key].reshape(flat.k, -1) for s in states], 1).to(flat.params)
                       for key in ("exp_avg", "exp_avg_sq")]
            self._bind_state(group, flat, *moments, [int(s["step"]) for s in states])


class SAM:
    """Sharpness-aware minimisation around a base optimizer, with per-model rho and norms.

    Each training step is two forward/backward passes:
        loss(model(x)).backward();              sam.first_step()   # theta -> theta + eps
        loss(model(x)).backward();              sam.second_step()  # back to theta, base step
    with eps_k = rho_k g_k / ||g_k|| and ||g_k||^2 the sum over all parameters of model k's
    squared gradient. adaptive=True gives ASAM: eps_k = rho_k |w|^2 g_k / || |w| g_k ||.
    rho_k = 0 gives eps_k = 0 exactly, i.e. plain training for that model.

    BatchNorm: its running statistics must be updated only in the first forward of a
    step; the trainer tells the model so for the second forward. SAM itself knows nothing
    about the model.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float | Tensor, adaptive: bool = False):
        self.base_optimizer = base_optimizer
        self.adaptive = adaptive
        self.params = [p for group in base_optimizer.param_groups for p in group["params"]]
        self.rho = _per_model(rho, _model_count(self.params), self.params[0])
        self.saved: dict[Tensor, Tensor] = {}  # theta before the perturbation, per chunk (see _chunks)
        self.perturbed: list[tuple[Tensor, Tensor]] = []  # the chunks first_step moved this step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    def _chunks(self) -> list[tuple[Tensor, Tensor]]:
        """(parameters, gradients) pairs with leading dim K: BatchedAdamW's [K, P] buffers (a few ops
        per step), or each parameter that has a gradient, for any other base optimizer."""
        if isinstance(self.base_optimizer, BatchedAdamW):
            return self.base_optimizer.flat_params_and_grads()
        return [(p, p.grad) for p in self.params if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move every parameter to theta + eps (the sharpest nearby point) and remember theta."""
        with record_function("SAM.first_step"):  # a named region in profiles (bench/fit.py counts its ops)
            self._perturb()
        if zero_grad:
            self.zero_grad()

    def _perturb(self) -> None:
        self.perturbed = self._chunks()
        if not self.perturbed:
            return
        # ||T_w g||^2 per model, summed over parameters; T_w = |w| for ASAM, identity for SAM.
        sq_norm = sum(self._scaled(p, g).square().reshape(len(p), -1).sum(1) for p, g in self.perturbed)
        scale = self.rho / (sq_norm.sqrt() + 1e-12)  # [K]; +1e-12 keeps a zero gradient finite
        for p, g in self.perturbed:
            if p not in self.saved:
                self.saved[p] = torch.empty_like(p)
            self.saved[p].copy_(p)
            p.add_(self._scaled(p, self._scaled(p, g)) * _along_dim0(scale, p))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True, lr_scale: float | Tensor = 1.0, on_device: bool = False) -> None:
        """Restore theta and take the base optimizer's step with the gradient from theta + eps.

        lr_scale (a Python float, or a [K] tensor) is forwarded to the base step, e.g. BatchedAdamW.step;
        on_device=True too (BatchedAdamW.device_step: the whole SAM step can then be graph-captured).
        """
        with record_function("SAM.second_step"):
            for p, _ in self.perturbed:
                p.copy_(self.saved[p])
        self.perturbed = []
        if on_device:
            self.base_optimizer.step(lr_scale=lr_scale, on_device=True)
        # Base optimizers without lr_scale (e.g. torch.optim.SGD) work with lr_scale=1.
        elif isinstance(lr_scale, Tensor) or lr_scale != 1.0:
            self.base_optimizer.step(lr_scale=lr_scale)
        else:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _scaled(self, p: Tensor, x: Tensor) -> Tensor:
        return p.abs() * x if self.adaptive else x

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """The base optimizer's zero_grad; None: its default (BatchedAdamW zeroes its buffer in place)."""
        if set_to_none is None:
            self.base_optimizer.zero_grad()
        else:
            self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM keeps nothing between steps) plus rho."""
        return {"base": self.base_optimizer.state_dict(), "rho": self.rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.rho = state_dict["rho"].to(self.rho.device)
