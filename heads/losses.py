"""Training losses for the classifier heads: per-sample BCE / VS, CVaR, pairwise AUC.

Every function works on logits shaped [K, B] (K models of a sweep, each with its own
batch of B samples) or plain [B] (K absent). Labels are [K, B] like the logits, or one [B]
vector for every model (a sweep's shared batch). Labels are 1 = fake, 0 = real; unknown
(-1) samples must be dropped before calling a loss. Per-model hyperparameters (alpha,
gamma) are floats or [K] tensors, best already on the logits' device. Nothing here
syncs with the host on a GPU, so the losses can run every step there (on a CPU the pair
term of shared labels gathers fakes and reals by index); range checks live in
heads.config.validate, the one check of a configuration.

The total head loss follows the paper (arXiv 2505.02182) and its reference code:
    L = CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss,
where alpha = 1 gives the plain mean (ERM) and gamma = 0 switches the AUC term off.

Every kind of loss is one entry of a registry: PER_SAMPLE_LOSSES (RunConfig.loss) and
AUC_TERMS (RunConfig.auc_kind). An entry holds its maths and the RunConfig fields it reads;
`Objective` turns a group's configs into those per-model options once, and `head_loss` is the
one function that combines the terms. docs/architecture.md ("Adding a loss or a head kind") shows how to add one.

`sp_cup_loss` is the other objective (RunConfig.objective = "sp_cup:MODE"): the reference
code's calculate_loss in each of its five modes, literally, with its searched lambda computed
exactly. Its vs_cvar_auc (the reference's default) is not a head_loss composition: lambda
comes from the VS losses but is applied to the BCE losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_model(value: float | Tensor, like: Tensor) -> Tensor:
    """A float or [K] hyperparameter as a tensor broadcastable against [K, B] (shape [K, 1])."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.unsqueeze(-1) if value.ndim == 1 else value


def bce_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy with logits for every sample, same shape as `logits` (labels broadcast)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).expand_as(logits), reduction="none")


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


def vs_bce(logits: Tensor, labels: Tensor, **vs) -> Tensor:
    """The VS loss per sample: BCE on `vs_logits(logits, labels, **vs)`."""
    return bce_per_sample(vs_logits(logits, labels, **vs), labels)


def logistic_pairs(diff: Tensor) -> Tensor:
    """log(1 + exp(-d)) for every pair difference d = z_fake - z_real."""
    return F.softplus(-diff)


def squared_hinge_pairs(diff: Tensor, margin: float | Tensor = 1.0) -> Tensor:
    """max(0, margin - d)^2 for every pair difference d = z_fake - z_real."""
    return (margin - diff).clamp(min=0.0).square()


def clamped_logistic_pairs(diff: Tensor) -> Tensor:
    """-log(clamp(sigmoid(d), 1e-6, 1 - 1e-6)) per pair: the reference's pAUCLoss, literally.

    Equal to logistic_pairs while |d| < log(1e6 - 1) = 13.8; past that the clamp caps a pair's
    loss at -log(1e-6) = 13.8 and its gradient is exactly 0 (the same on the easy side).
    """
    return -torch.log(torch.sigmoid(diff).clamp(1e-6, 1 - 1e-6))


# --- the registries ------------------------------------------------------------------------


@dataclass(frozen=True)
class LossKind:
    """One registered loss term.

    fn: the maths. A per-sample loss maps (logits [..., B], labels [..., B], **options) to
    [..., B]; an AUC term maps the pair differences d = z_fake - z_real [..., B, B] (and
    **options) to a loss per pair. options: keyword of fn -> the RunConfig field it comes from
    (Objective reads those fields per model; keywords left out keep fn's defaults).
    """

    fn: Callable[..., Tensor]
    options: Mapping[str, str] = field(default_factory=dict)
    doc: str = ""


PER_SAMPLE_LOSSES: dict[str, LossKind] = {
    "bce": LossKind(bce_per_sample, {}, "binary cross-entropy"),
    "vs": LossKind(vs_bce, {"delta_fake": "vs_delta_fake", "delta_real": "vs_delta_real",
                            "iota_fake": "vs_iota_fake", "iota_real": "vs_iota_real", "scale": "vs_scale"},
                   "vector-scaling loss: BCE on class-dependent rescaled and shifted logits"),
}
AUC_TERMS: dict[str, LossKind] = {
    "logistic": LossKind(logistic_pairs, {}, "log(1 + exp(-d)) per (fake, real) pair"),
    "squared_hinge": LossKind(squared_hinge_pairs, {"margin": "auc_margin"}, "max(0, margin - d)^2 per pair"),
    "clamped_logistic": LossKind(clamped_logistic_pairs, {},
                                 "-log(clamp(sigmoid(d), 1e-6, 1 - 1e-6)) per pair (the reference's pAUCLoss)"),
}


def _entry(registry: dict[str, LossKind], kind: str, what: str) -> LossKind:
    if kind not in registry:
        raise ValueError(f"unknown {what} {kind!r}; expected one of {tuple(registry)}")
    return registry[kind]


def _own(entry: LossKind, options: Mapping[str, float | Tensor] | None) -> dict:
    """The options `entry` declares; one call site passes every option, so the rest are ignored."""
    return {k: v for k, v in (options or {}).items() if k in entry.options}


def per_sample_loss(logits: Tensor, labels: Tensor, kind: str = "bce", **options) -> Tensor:
    """The registered per-sample loss `kind`, same shape as logits; options: its keywords (vs: delta_fake, ...)."""
    entry = _entry(PER_SAMPLE_LOSSES, kind, "per-sample loss")
    return entry.fn(logits, labels, **_own(entry, options))


def pairwise_auc_loss(logits: Tensor, labels: Tensor, kind: str = "logistic", **options) -> Tensor:
    """Mean surrogate AUC loss over all (fake, real) pairs of each model's batch.

    For every pair the difference d = z_fake - z_real is penalised by the AUC_TERMS entry
    `kind`: log(1 + exp(-d)) (logistic) or max(0, margin - d)^2 (squared_hinge, option margin).
    A per-model option is a [K, 1, 1] tensor (broadcast against the [K, B, B] pairs); options
    the kind does not declare are ignored. A model whose batch lacks one of the classes gets
    exactly 0 (and zero gradient). Memory is O(K B^2) for the pair matrix. Returns
    shape logits.shape[:-1].
    """
    entry = _entry(AUC_TERMS, kind, "AUC loss kind")
    if labels.dim() == 1 and logits.device.type == "cpu":
        return _shared_label_pairs(entry, logits, labels, options)
    return _masked_pairs(entry, logits, labels, options)


def _masked_pairs(entry: LossKind, logits: Tensor, labels: Tensor, options) -> Tensor:
    """pairwise_auc_loss over the [.., B, B] pair matrix with a fake-real mask: no host read and the
    same shapes whatever the labels (the GPU path, which a CUDA graph can capture)."""
    diff = logits.unsqueeze(-1) - logits.unsqueeze(-2)  # [.., i, j] = z_i - z_j
    is_pair = (labels == 1).unsqueeze(-1) & (labels == 0).unsqueeze(-2)  # i fake, j real
    pair_loss = entry.fn(diff, **_own(entry, options))
    # where(), not multiply: keeps non-pairs out of the sum and their gradient exactly 0.
    total = torch.where(is_pair, pair_loss, 0.0).sum((-2, -1))
    n_pairs = is_pair.sum((-2, -1)).clamp(min=1)  # 0 pairs -> 0 / 1 = 0, never NaN
    return total / n_pairs


def _shared_label_pairs(entry: LossKind, logits: Tensor, labels: Tensor, options) -> Tensor:
    """pairwise_auc_loss when one label vector [B] serves every model: the fakes and the reals are
    gathered once, so the pair matrix is [.., fakes, reals] with no mask, a quarter or less of the
    [.., B, B] one (the CPU path: finding them reads the labels back, which a GPU would wait for)."""
    fakes, reals = (labels == 1).nonzero().squeeze(1), (labels == 0).nonzero().squeeze(1)
    if fakes.numel() == 0 or reals.numel() == 0:  # no pairs: exactly 0, and 0 gradient
        return logits.new_zeros(logits.shape[:-1])
    diff = logits[..., fakes, None] - logits[..., None, reals]
    return entry.fn(diff, **_own(entry, options)).mean((-2, -1))


def head_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor = 1.0,
    gamma: float | Tensor = 0.0,
    loss: str = "bce",
    auc_kind: str = "logistic",
    loss_options: Mapping[str, float | Tensor] | None = None,
    auc_options: Mapping[str, float | Tensor] | None = None,
    auc_rows: Tensor | None = None,
) -> Tensor:
    """The training loss of each head: CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss.

    loss / auc_kind name PER_SAMPLE_LOSSES / AUC_TERMS entries; loss_options / auc_options are
    their keywords (per model: [K, 1] for the per-sample loss, [K, 1, 1] for the AUC term).
    The AUC term is on the raw logits (the score ranking), as in the reference code.
    Returns [K] for [K, B] logits (sum it for backward: each model gets its own gradient)
    or a scalar for [B]. A gamma given as the float 0 skips the O(B^2) AUC term entirely;
    auc_rows ([M] model indices) computes it only for those models, whose gamma is then the
    only nonzero one (the others add exactly 0).
    """
    total = cvar_loss(per_sample_loss(logits, labels, loss, **(loss_options or {})), alpha)
    if not isinstance(gamma, Tensor) and gamma == 0.0:
        return total
    gamma = torch.as_tensor(gamma, dtype=logits.dtype, device=logits.device)  # [K] or scalar
    if auc_rows is None:
        return total + gamma * pairwise_auc_loss(logits, labels, auc_kind, **(auc_options or {}))
    rows = {k: v[auc_rows] if isinstance(v, Tensor) and v.ndim else v for k, v in (auc_options or {}).items()}
    shared = labels.dim() < logits.dim()  # one label vector for every model
    auc = pairwise_auc_loss(logits[auc_rows], labels if shared else labels[auc_rows], auc_kind, **rows)
    return total.index_add(0, auc_rows, gamma[auc_rows] * auc)


# --- the reference's objectives, literally ---------------------------------------------------

# calculate_loss in the reference's train_epoch (Purdue-M2/SP_CUP, train_test_clipv1.py): --objective sp_cup:MODE.
SP_CUP_MODES = ("erm", "dag", "auc", "vs", "vs_cvar_auc")
# Its BinaryVSLoss(iota_pos=-0.05, iota_neg=0.05, Delta_pos=0.9, Delta_neg=1.1) on 10 * logits, label 1 = pos;
# RunConfig's vs_* defaults are these values.
SP_CUP_VS = {"delta_fake": 0.9, "delta_real": 1.1, "iota_fake": -0.05, "iota_real": 0.05, "scale": 10.0}
_SP_CUP_SEARCH_BELOW = 1000.0  # its fminbound searches lambda in [min(bce) - 1000, max(bce)]


def searched_lambda(search_losses: Tensor, alpha: float | Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """The lambda the reference's fminbound finds, exactly, as a constant (no gradient).

    The reference minimises f(x) = x + mean(relu(l - x)) / alpha over x in [lower, upper].
    f is convex and piecewise linear with slope 1 - #{l_i > x} / (alpha n), so its minimiser
    is the ceil(alpha n)-th largest l_i, unique when alpha n is fractional; then it is clamped
    to the bounds. When alpha n = m is an integer every x in [l_(m+1), l_(m)] is a minimiser
    and the search stops somewhere inside; we take the (floor(alpha n) + 1)-th largest loss,
    the lower end of that interval, where exactly m losses lie above lambda, as at a point
    inside (so the dag gradient is the search's; the lower bound stands in for l_(n+1)).
    alpha n is rounded in float64 with a 1e-9 tolerance, so 0.3 * 10 counts as the integer 3;
    pass alpha as a Python float or a float64 tensor for that. Shapes: search_losses [..., B],
    alpha float or [K], lower/upper [...]; returns [...].
    """
    n = search_losses.shape[-1]
    budget = torch.as_tensor(alpha, dtype=torch.float64, device=search_losses.device) * n
    rank = torch.floor(budget + 1e-9).long().clamp(max=n)  # 0-based rank of lambda among the losses
    worst_first = search_losses.detach().sort(dim=-1, descending=True).values
    padded = torch.cat([worst_first, lower.detach().unsqueeze(-1).to(worst_first.dtype)], dim=-1)
    lam = padded.gather(-1, rank.expand(lower.shape).unsqueeze(-1)).squeeze(-1)
    return torch.minimum(torch.maximum(lam, lower), upper).detach()


def _cvar_at(losses: Tensor, lam: Tensor, alpha: float | Tensor) -> Tensor:
    """The reference's searched_lamda_loss: lam + mean(relu(losses - lam)) / alpha, lam a constant."""
    alpha = torch.as_tensor(alpha, dtype=losses.dtype, device=losses.device)
    return lam + F.relu(losses - lam.unsqueeze(-1)).mean(-1) / alpha


def sp_cup_loss(
    logits: Tensor,
    labels: Tensor,
    mode: str,
    alpha: float | Tensor = 0.9,
    gamma: float | Tensor = 0.6,
    vs: Mapping[str, float | Tensor] | None = None,
) -> Tensor:
    """The reference's per-batch objective of `mode` (one of SP_CUP_MODES), with its exact lambda.

    With bce the per-sample BCE, pauc the mean over (fake, real) pairs of
    clamped_logistic_pairs(z_fake - z_real) and "one class" a batch without fakes or without reals:
      erm          mean(bce)
      vs           mean(VS loss): BCE on 10 * (Delta_y z - iota_y), SP_CUP_VS (or `vs`, vs_logits' keywords)
      dag          lam + mean(relu(bce - lam)) / alpha, lam = searched_lambda(bce, ...)
      auc          mean(bce) + gamma * pauc;                       one class: mean(bce)
      vs_cvar_auc  lam + mean(relu(bce - lam)) / alpha + gamma * pauc, one class: mean(bce);
                   lam is searched on the VS losses with the bounds [min(bce) - 1000, max(bce)]
                   (so lam = min(that VS loss, max(bce))), then applied to the BCE losses;
                   VS gets no gradient.
    The reference gets lam from scipy's fminbound (tolerance 1e-5); we take the minimiser
    itself, no search and no host sync. As there, lam is a constant: the gradient reaches the
    samples whose loss is strictly above it (see searched_lambda for integer alpha n).
    Shapes as every loss here: logits/labels [K, B] (or [B]); alpha, gamma floats or [K];
    `vs` values floats or [K, 1]. Returns [K] (or a scalar).
    """
    if mode not in SP_CUP_MODES:
        raise ValueError(f"unknown SP_CUP mode {mode!r}; expected one of {SP_CUP_MODES}")
    vs = {**SP_CUP_VS, **(vs or {})}
    bce = bce_per_sample(logits, labels)
    if mode == "erm":
        return bce.mean(-1)
    if mode == "vs":
        return vs_bce(logits, labels, **vs).mean(-1)
    lower, upper = bce.min(-1).values - _SP_CUP_SEARCH_BELOW, bce.max(-1).values
    if mode == "dag":  # no one-class fallback in the reference's dag
        return _cvar_at(bce, searched_lambda(bce, alpha, lower, upper), alpha)
    if mode == "auc":
        main = bce.mean(-1)
    else:
        main = _cvar_at(bce, searched_lambda(vs_bce(logits.detach(), labels, **vs), alpha, lower, upper), alpha)
    gamma = torch.as_tensor(gamma, dtype=logits.dtype, device=logits.device)
    both_classes = (labels == 1).any(-1) & (labels == 0).any(-1)
    return torch.where(both_classes, main + gamma * pairwise_auc_loss(logits, labels, "clamped_logistic"),
                       bce.mean(-1))


def objective_mode(objective: str) -> str | None:
    """RunConfig.objective -> the SP_CUP mode ('sp_cup:dag' -> 'dag'), or None for dfclip's own."""
    return objective.split(":", 1)[1] if objective.startswith("sp_cup:") else None


class Objective:
    """The loss of one batched group of heads, built once from its configs: call it on [K, B] logits.

    objective "dfclip": head_loss with the group's loss and AUC kind; "sp_cup:MODE": sp_cup_loss
    with per-model alpha, gamma and VS values (the configs' cvar_alpha, auc_gamma, vs_*).

    Hyperparameters become [K] tensors on `device` (alpha, gamma and every option the group's
    loss and AUC kind declare), so a step never syncs with the host. Only models with
    gamma > 0 pay for the O(B^2) pair term: grids often mix in gamma = 0 (measured: a 24-head
    linear sweep with half gamma = 0 ran 1.9x faster on CPU, same results).
    """

    def __init__(self, cfgs: Sequence, device: torch.device | str = "cpu"):
        c0 = cfgs[0]
        self.loss, self.auc_kind = c0.loss, c0.auc_kind
        self.sp_cup_mode = objective_mode(c0.objective)

        def per_model(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor([float(getattr(c, name)) for c in cfgs], device=device, dtype=dtype)

        if self.sp_cup_mode is not None:  # the reference's objective: alpha, gamma and the VS constants per model
            self.alpha = per_model("cvar_alpha", torch.float64)  # float64: integer alpha n is found exactly
            self.gamma = per_model("auc_gamma")
            self.vs = {kw: per_model(f)[:, None] for kw, f in PER_SAMPLE_LOSSES["vs"].options.items()}
            return
        self.alpha = per_model("cvar_alpha")
        self.loss_options = {kw: per_model(f)[:, None]
                             for kw, f in _entry(PER_SAMPLE_LOSSES, c0.loss, "per-sample loss").options.items()}
        self.auc_options = {kw: per_model(f)[:, None, None]
                            for kw, f in _entry(AUC_TERMS, c0.auc_kind, "AUC loss kind").options.items()}
        auc_models = [i for i, c in enumerate(cfgs) if c.auc_gamma > 0]
        self.gamma: float | Tensor = per_model("auc_gamma") if auc_models else 0.0
        self.auc_rows = None if len(auc_models) == len(cfgs) else torch.tensor(auc_models, device=device)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss per model [K] of logits [K, B] against labels [K, B], or [B] shared by the K models."""
        if self.sp_cup_mode is not None:
            return sp_cup_loss(logits, labels, self.sp_cup_mode, self.alpha, self.gamma, self.vs)
        return head_loss(logits, labels, alpha=self.alpha, gamma=self.gamma, loss=self.loss, auc_kind=self.auc_kind,
                         loss_options=self.loss_options, auc_options=self.auc_options, auc_rows=self.auc_rows)
