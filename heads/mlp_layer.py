"""One hidden layer of the batched MLP: Linear -> BatchNorm -> ReLU (-> Dropout in training), for K
models at once; in training an autograd Function with its backward written out (HiddenLayer), in
eval a plain function (eval_hidden_layer) on the same kernels.

Why not plain autograd over the modules: on a CPU most of a step's time went to glue, not
arithmetic (measured on the 2-core development box, paper head, bf16). Autocast copied each
weight to bf16 and each weight gradient back through a transposed, unvectorised copy;
BatchNorm ran as seven separate float32 passes; dropout drew one float per activation and
multiplied by a bool mask (a slow mixed-dtype path). Here a layer is:
    z   = h @ W^T                  one matmul in the compute dtype (bf16 or float32)
    out = relu(BN(z)) * keep       torch's own batch-norm kernel (statistics in float32)
and its backward is the textbook one: one threshold on the output (the ReLU and dropout masks
together), torch's batch-norm backward, then dW = dz^T h and dh = dz W as two matmuls whose
outputs are already laid out as W and h.

Layout: BatchNorm normalises each of the K*H columns over the B rows of a [B, K*H] matrix, so
activations live as [B, K*H]; the [K, B, H] that the caller sees is a view of it. For K = 1 or
a shared first-layer input no copy is made; for K > 1 each later layer copies once each way.

Exactness (tests/test_models.py checks all of it against the modules and autograd):
- The Linear bias is not added: BatchNorm subtracts the batch mean, so the output is the same
  without it. It enters only the running mean (updated with mean(z) + bias), and its gradient
  is the batch sum of dL/dz, as autograd would give it.
- The dropout scale 1/(1-p) is folded into BatchNorm's affine (relu(s*y) = s*relu(y), s > 0),
  so the kept activations are scaled in float32 inside the kernel, never by a rounded bf16 s.
- keep_mask draws 16 random bits per activation: a unit is dropped with probability
  round(65536 p) / 65536, within 2^-17 of p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def keep_mask(rows: int, cols: int, p: float, generators: Sequence[torch.Generator | None], which: Sequence[int],
              dtype: torch.dtype, device: torch.device) -> Tensor:
    """Dropout keep-masks [rows, K, cols] (or [rows, 1, cols] when one generator serves every model)
    of 0 and 1 in `dtype`: generator g draws a [rows, cols] mask; model k uses generators[which[k]]
    (None: torch's default generator of `device`).

    Each mask comes from rows*cols/4 random 64-bit integers split into 16-bit lanes: a lane v
    keeps its unit iff v >= round(65536 p) - 32768. That costs a quarter of the generator calls
    of one uniform float per unit, and the comparison runs as an integer clamp, not a bool mask.
    """
    n = rows * cols
    threshold = round(p * 65536) - 32768
    masks = []
    for g in generators:
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=g)
        lanes = bits.view(torch.int16)[:n].view(rows, cols)
        # clamp to [t - 1, t], minus (t - 1): 1 where v >= t, else 0, with no overflow in int16
        masks.append(lanes.clamp(threshold - 1, threshold).sub_(threshold - 1).to(dtype))
    if len(masks) == 1:
        return masks[0][:, None, :]
    return torch.stack([masks[i] for i in which], dim=1)  # no index tensor: nothing to copy to a GPU


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """torch.bmm, but a batch of one goes through mm: on a CPU, bmm of one matrix with a transposed
    operand took 2-3x as long as mm of the same two (torch 2.14, bf16, measured)."""
    return (a[0] @ b[0]).unsqueeze(0) if a.shape[0] == 1 else torch.bmm(a, b)


def _matmul_by_rows(h: Tensor, w: Tensor) -> Tensor:
    """z = h @ W^T of every model, as the [B, K*H] matrix BatchNorm's kernels normalise by column.
    h: [B, in] shared or [K, B, in]; w: [K, H, in] in h's dtype."""
    k, width, fan_in = w.shape
    if h.dim() == 2:  # shared input: one [B, in] x [in, K*H] matmul, already [B, K*H]
        return h @ w.reshape(k * width, fan_in).T
    return _bmm(h, w.transpose(1, 2)).transpose(0, 1).reshape(h.shape[1], k * width)


def eval_hidden_layer(h: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                      running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """Eval mode: Linear -> BatchNorm (running statistics) -> ReLU, in h's dtype; arguments as HiddenLayer's.

    With running statistics, Linear + BatchNorm is one affine map per column of z = h @ W^T:
        (z + b - mean) * s + beta = z * s + t,  s = gamma / sqrt(var + eps),  t = beta + (b - mean) * s.
    s and t are float32 (and differentiable); torch's eval batch-norm kernel applies them with mean 0,
    var 1 and eps 0, i.e. exactly z * s + t, in float32 inside the kernel even for a bf16 z.
    Returns [K, B, H] (a view of a [B, K*H] matrix).
    """
    k, width, _ = weight.shape
    z = _matmul_by_rows(h, weight.to(h.dtype))
    scale = bn_weight * torch.rsqrt(running_var + eps)
    shift = bn_bias + (bias - running_mean) * scale
    zeros = torch.zeros(k * width, dtype=scale.dtype, device=scale.device)
    out = torch.native_batch_norm(z, scale.reshape(-1), shift.reshape(-1), zeros, torch.ones_like(zeros), False,
                                  0.0, 0.0)[0]
    return out.relu_().view(z.shape[0], k, width).transpose(0, 1)


class HiddenLayer(torch.autograd.Function):
    """Linear -> BatchNorm (train mode) -> ReLU -> Dropout for K models; see the module docstring.

    forward(h, weight, bias, bn_weight, bn_bias, keep, scale, eps, running_mean, running_var, momentum):
      h: [B, in] (one batch shared by the K models) or [K, B, in], in the compute dtype;
      weight [K, H, in], bias [K, H], bn_weight / bn_bias [K, H]: the float32 parameters;
      keep: [B, K or 1, H] keep-mask in the compute dtype, or None (no dropout); scale = 1/(1-p);
      running_mean / running_var [K, H] or None: updated in place (momentum; the bias included).
    Returns [K, B, H] in the compute dtype (a view of a [B, K*H] matrix).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                keep: Tensor | None, scale: float, eps: float, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float) -> Tensor:
        k, width, fan_in = weight.shape
        w = weight.to(h.dtype)  # the compute-dtype copy, made once per forward
        z = _matmul_by_rows(h, w)
        rows = z.shape[0]
        gamma, beta = (bn_weight * scale).reshape(-1), (bn_bias * scale).reshape(-1)  # the dropout scale, folded in
        out, mean, invstd = torch.native_batch_norm(
            z, gamma, beta, None if running_mean is None else running_mean.view(-1),
            None if running_var is None else running_var.view(-1), True, momentum, eps)
        if running_mean is not None:  # the kernel updated with mean(z); the bias shifts every z alike
            running_mean.add_(bias.detach(), alpha=momentum)
        out = out.relu_().view(rows, k, width)
        if keep is not None:
            out.mul_(keep)
        ctx.save_for_backward(h, w, z, gamma, mean, invstd, out)
        ctx.scale, ctx.eps, ctx.param_dtype = scale, eps, weight.dtype
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, z, gamma, mean, invstd, out = ctx.saved_tensors
        k, width, fan_in = w.shape
        rows = z.shape[0]
        g = grad.transpose(0, 1).to(out.dtype)  # [B, K, H], as out
        # Where out > 0 the unit passed ReLU and was kept (keep = 1: the scale is in gamma); elsewhere
        # its gradient is 0. So one threshold on out is the ReLU and the dropout backward together.
        g = torch.ops.aten.threshold_backward(g, out, 0).reshape(rows, k * width)
        dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            g, z, gamma, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        dbias = dz.sum(0, dtype=ctx.param_dtype).view(k, width)
        # d/d(bn_weight) = scale * d/d(gamma), as gamma = scale * bn_weight
        dbn_weight, dbn_bias = (dgamma * ctx.scale).view(k, width), (dbeta * ctx.scale).view(k, width)
        dh = None
        if h.dim() == 2:
            dweight = (dz.T @ h).view(k, width, fan_in)
            if ctx.needs_input_grad[0]:
                dh = dz @ w.reshape(k * width, fan_in)
        else:
            dz_k = dz.view(rows, k, width).transpose(0, 1)  # [K, B, H]
            dweight = _bmm(dz_k.transpose(1, 2), h)
            if ctx.needs_input_grad[0]:
                dh = _bmm(dz_k, w)
        return dh, dweight.to(ctx.param_dtype), dbias, dbn_weight, dbn_bias, None, None, None, None, None, None
