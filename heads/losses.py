"""Training losses for the classifier heads: per-sample BCE / VS, CVaR, pairwise AUC.

Every function works on logits shaped [K, B] (K models of a sweep, each with its own
batch of B samples) or plain [B] (K absent). Labels are 1 = fake, 0 = real; unknown
(-1) samples must be dropped before calling a loss. Per-model hyperparameters (alpha,
gamma) are floats or [K] tensors, best already on the logits' device. Nothing here
syncs with the host, so the losses can run every step on a GPU; range checks live in
`check_loss_args`, called once at config time.

The total head loss follows the paper (arXiv 2505.02182) and its reference code:
    L = CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss,
where alpha = 1 gives the plain mean (ERM) and gamma = 0 switches the AUC term off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dfclip.errors import UserError

PER_SAMPLE_KINDS = ("bce", "vs")
AUC_KINDS = ("logistic", "squared_hinge")


def _per_model(value: float | Tensor, like: Tensor) -> Tensor:
    """A float or [K] hyperparameter as a tensor broadcastable against [K, B] (shape [K, 1])."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.unsqueeze(-1) if value.ndim == 1 else value


def bce_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy with logits for every sample, same shape as `logits`."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def vs_logits(
    logits: Tensor,
    labels: Tensor,
    delta_fake: float | Tensor = 0.9,
    delta_real: float | Tensor = 1.1,
    iota_fake: float | Tensor = -0.05,
    iota_real: float | Tensor = 0.05,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """Vector-scaling (VS) adjusted logits z' = scale * (Delta_y * z - iota_y).

    VS loss (Kini et al., 2021) fights class imbalance by rescaling (Delta) and shifting
    (iota) each sample's logit according to its true class before the cross-entropy:
    BCE on z' is the VS loss. With the defaults (those of the reference code) a fake's
    logit is shrunk and pushed up, a real's logit stretched and pushed down, so the head
    must separate the classes by a larger margin in the original logit. `scale` is the
    sharpening factor; the reference code uses scale=10, the plain VS loss scale=1.
    Per-model values are [K, 1] tensors (broadcast against [K, B] logits).
    """
    # Both branches in the logits' own dtype (no float32 constants sneaking into float64).
    adjusted = torch.where(labels == 1, delta_fake * logits - iota_fake, delta_real * logits - iota_real)
    return scale * adjusted


def cvar_loss(losses: Tensor, alpha: float | Tensor) -> Tensor:
    """Conditional value at risk of `losses` over the last dim: the mean of the worst alpha fraction.

    CVaR_alpha(l) = min_lambda { lambda + 1/(alpha n) * sum_i max(l_i - lambda, 0) }. The
    minimum is reached at lambda = the (alpha n)-th largest loss, which gives the closed
    form used here: sort descending and average with weights w_j = clamp(alpha n - j, 0, 1)
    / (alpha n), j = 0..n-1. A fractional alpha n gives the boundary sample a fractional
    weight, exactly as the min-over-lambda does. No search and no host sync; the gradient
    flows only to the worst samples. alpha in (0, 1] (float or [K] tensor); alpha = 1 is
    the mean (ERM), alpha -> 0 the max. Returns shape losses.shape[:-1].
    """
    n = losses.shape[-1]
    worst_first = losses.sort(dim=-1, descending=True).values
    budget = _per_model(alpha, losses) * n  # alpha n, [K, 1] or scalar
    rank = torch.arange(n, dtype=losses.dtype, device=losses.device)
    weights = (budget - rank).clamp(0.0, 1.0)
    return (weights * worst_first).sum(-1) / budget.squeeze(-1)


def pairwise_auc_loss(
    logits: Tensor, labels: Tensor, kind: str = "logistic", margin: float | Tensor = 1.0
) -> Tensor:
    """Mean surrogate AUC loss over all (fake, real) pairs of each model's batch.

    For every pair the difference d = z_fake - z_real is penalised with
    log(1 + exp(-d)) (kind="logistic") or max(0, margin - d)^2 (kind="squared_hinge").
    A per-model margin is a [K, 1, 1] tensor (broadcast against the [K, B, B] pairs).
    A model whose batch lacks one of the classes gets exactly 0 (and zero gradient).
    Memory is O(K B^2) for the pair matrix. Returns shape logits.shape[:-1].
    """
    diff = logits.unsqueeze(-1) - logits.unsqueeze(-2)  # [.., i, j] = z_i - z_j
    is_pair = (labels == 1).unsqueeze(-1) & (labels == 0).unsqueeze(-2)  # i fake, j real
    if kind == "logistic":
        pair_loss = F.softplus(-diff)
    elif kind == "squared_hinge":
        pair_loss = (margin - diff).clamp(min=0.0).square()
    else:
        raise ValueError(f"unknown AUC loss kind {kind!r}; expected one of {AUC_KINDS}")
    # where(), not multiply: keeps non-pairs out of the sum and their gradient exactly 0.
    total = torch.where(is_pair, pair_loss, 0.0).sum((-2, -1))
    n_pairs = is_pair.sum((-2, -1)).clamp(min=1)  # 0 pairs -> 0 / 1 = 0, never NaN
    return total / n_pairs


def head_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor = 1.0,
    gamma: float | Tensor = 0.0,
    per_sample: str = "bce",
    auc_kind: str = "logistic",
    margin: float | Tensor = 1.0,
    vs: dict | None = None,
) -> Tensor:
    """The training loss of each head: CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss.

    per_sample="bce" uses plain BCE, "vs" uses BCE on `vs_logits(logits, labels, **vs)`.
    The AUC term is on the raw logits (the score ranking), as in the reference code.
    Returns [K] for [K, B] logits (sum it for backward: each model gets its own gradient)
    or a scalar for [B]. A gamma given as the float 0 skips the O(B^2) AUC term entirely.
    """
    if per_sample == "bce":
        losses = bce_per_sample(logits, labels)
    elif per_sample == "vs":
        losses = bce_per_sample(vs_logits(logits, labels, **(vs or {})), labels)
    else:
        raise ValueError(f"unknown per-sample loss {per_sample!r}; expected one of {PER_SAMPLE_KINDS}")
    loss = cvar_loss(losses, alpha)
    if isinstance(gamma, Tensor) or gamma != 0.0:
        gamma = torch.as_tensor(gamma, dtype=logits.dtype, device=logits.device)  # [K] or scalar
        loss = loss + gamma * pairwise_auc_loss(logits, labels, auc_kind, margin)
    return loss


def check_loss_args(
    alpha: float | Tensor | list[float],
    gamma: float | Tensor | list[float],
    *,
    per_sample: str = "bce",
    auc_kind: str = "logistic",
) -> None:
    """Raise UserError unless every alpha is in (0, 1], every gamma >= 0 and the kinds are known.

    Call once when the config is read (it syncs with the host), not every step.
    """
    alphas = torch.as_tensor(alpha, dtype=torch.float64).flatten().tolist()
    gammas = torch.as_tensor(gamma, dtype=torch.float64).flatten().tolist()
    for a in alphas:
        if not 0.0 < a <= 1.0:  # also rejects NaN
            raise UserError(
                f"alpha={a} is outside (0, 1]: set alpha to the fraction of worst samples to "
                "train on, e.g. 1 (plain mean) or 0.1 (worst 10%)"
            )
    for g in gammas:
        if not g >= 0.0:
            raise UserError(
                f"gamma={g} is negative: set gamma (the AUC loss weight) to 0 (off) or a positive value"
            )
    if per_sample not in PER_SAMPLE_KINDS:
        raise UserError(f"unknown per-sample loss {per_sample!r}: use one of {', '.join(PER_SAMPLE_KINDS)}")
    if auc_kind not in AUC_KINDS:
        raise UserError(f"unknown AUC loss {auc_kind!r}: use one of {', '.join(AUC_KINDS)}")
