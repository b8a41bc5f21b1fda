"""Optimizers for K heads trained at once: AdamW with per-model lr / weight decay, and SAM.

Every parameter has a leading model dimension K; model k's slice sees only its own
gradient, so these behave exactly like K independent optimizers, one per head, without
a Python loop over models. Per-model hyperparameters are floats or [K] tensors. The
steps never sync with the host.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


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


class BatchedAdamW(torch.optim.Optimizer):
    """AdamW (same maths as torch.optim.AdamW, amsgrad off) with per-model lr and weight decay.

    lr and weight_decay are floats or [K] tensors, applied along dim 0 of every parameter.
    `step(lr_scale)` multiplies every lr by the schedule factor the trainer computes
    (warmup / cosine); weight decay is decoupled and scaled by the scheduled lr, as in torch.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | Tensor = 1e-2,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim API), storing its lr and weight decay as [K] tensors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        k = _model_count(group["params"])
        for key in ("lr", "weight_decay"):
            group[key] = _per_model(group[key], k, group["params"][0])

    @torch.no_grad()
    def step(self, lr_scale: float | Tensor = 1.0) -> None:
        """One AdamW update of every parameter that has a gradient, lr multiplied by lr_scale (float or [K])."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"] * lr_scale  # [K]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: bias correction needs no device read
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]

                p.mul_(1.0 - _along_dim0(lr * group["weight_decay"], p))  # decoupled decay
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1 ** state["step"]
                bias_correction2_sqrt = (1.0 - beta2 ** state["step"]) ** 0.5
                denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                p.sub_(_along_dim0(lr / bias_correction1, p) * m / denom)

    def select(self, indices: list[int], params: list[Tensor]) -> BatchedAdamW:
        """A BatchedAdamW for models `indices` only, over `params`: the rows `indices` of this
        optimizer's parameters (in order, e.g. head.select(indices).parameters()), with those rows'
        moments, step counts, lr and weight decay, so the kept models continue exactly as before."""
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
        for p_old, p_new in zip(old, params):
            state = self.state.get(p_old)
            if state:
                new.state[p_new] = {"step": state["step"], "exp_avg": state["exp_avg"][rows],
                                    "exp_avg_sq": state["exp_avg_sq"][rows]}
        return new

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, moving the per-model lr / weight decay to the parameters' device."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in ("lr", "weight_decay"):
                like = group["params"][0]
                group[key] = torch.as_tensor(group[key]).to(device=like.device, dtype=like.dtype).clone()


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
        self.saved: dict[Tensor, Tensor] = {}  # theta before the perturbation, per parameter
        self.perturbed: list[Tensor] = []  # the parameters first_step moved this step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move every parameter to theta + eps (the sharpest nearby point) and remember theta."""
        with_grad = [p for p in self.params if p.grad is not None]
        self.perturbed = with_grad
        if not with_grad:
            return
        # ||T_w g||^2 per model, summed over parameters; T_w = |w| for ASAM, identity for SAM.
        sq_norm = sum(self._scaled(p, p.grad).square().reshape(len(p), -1).sum(1) for p in with_grad)
        scale = self.rho / (sq_norm.sqrt() + 1e-12)  # [K]; +1e-12 keeps a zero gradient finite
        for p in with_grad:
            if p not in self.saved:
                self.saved[p] = torch.empty_like(p)
            self.saved[p].copy_(p)
            eps = self._scaled(p, self._scaled(p, p.grad)) * _along_dim0(scale, p)
            p.add_(eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True, lr_scale: float | Tensor = 1.0) -> None:
        """Restore theta and take the base optimizer's step with the gradient from theta + eps.

        lr_scale (a Python float, or a [K] tensor) is forwarded to the base step, e.g. BatchedAdamW.step.
        """
        for p in self.perturbed:
            p.copy_(self.saved[p])
        self.perturbed = []
        # Base optimizers without lr_scale (e.g. torch.optim.SGD) work with lr_scale=1.
        if isinstance(lr_scale, Tensor) or lr_scale != 1.0:
            self.base_optimizer.step(lr_scale=lr_scale)
        else:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _scaled(self, p: Tensor, x: Tensor) -> Tensor:
        return p.abs() * x if self.adaptive else x

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM keeps nothing between steps) plus rho."""
        return {"base": self.base_optimizer.state_dict(), "rho": self.rho}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.rho = state_dict["rho"].to(self.rho.device)
