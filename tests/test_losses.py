"""heads.losses checked against definitions: brute-force CVaR, explicit pair loops, hand maths."""

import math

import numpy as np
import pytest
import torch

from dfclip.heads.config import CHOICES, FIELDS, make_config
from dfclip.heads.losses import (
    AUC_TERMS,
    PER_SAMPLE_LOSSES,
    SP_CUP_MODES,
    Objective,
    bce_per_sample,
    cvar_loss,
    head_loss,
    pairwise_auc_loss,
    sp_cup_loss,
    vs_logits,
)


def brute_cvar(losses: np.ndarray, alpha: float) -> float:
    """min over lambda of lambda + mean(max(l - lambda, 0)) / alpha, on a grid plus every l_i.

    The objective is piecewise linear and convex with kinks at the l_i, so its minimum
    is at one of them; the dense grid is a check that nothing lower lies in between.
    """
    grid = np.linspace(losses.min() - 1.0, losses.max() + 1.0, 2001)
    lambdas = np.concatenate([grid, losses])
    objective = lambdas + np.maximum(losses[None, :] - lambdas[:, None], 0.0).mean(1) / alpha
    return float(objective.min())


def brute_auc(z: list[float], y: list[int], kind: str, margin: float = 1.0) -> float:
    """Mean pair loss over (fake, real) pairs by an explicit double loop; 0 without pairs."""
    total, pairs = 0.0, 0
    for i in range(len(z)):
        for j in range(len(z)):
            if y[i] == 1 and y[j] == 0:
                d = z[i] - z[j]
                if kind == "logistic":
                    total += math.log1p(math.exp(-d))
                elif kind == "clamped_logistic":
                    total += -math.log(min(max(1 / (1 + math.exp(-d)), 1e-6), 1 - 1e-6))
                else:
                    total += max(0.0, margin - d) ** 2
                pairs += 1
    return total / pairs if pairs else 0.0


def test_cvar_matches_min_over_lambda():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        alpha = float(rng.uniform(0.005, 1.0)) if trial % 4 else int(rng.integers(1, n + 1)) / n
        losses = rng.exponential(size=n).astype(np.float32)
        got = cvar_loss(torch.from_numpy(losses), alpha).item()
        want = brute_cvar(losses.astype(np.float64), alpha)
        assert got == pytest.approx(want, rel=1e-5), (n, alpha)


def test_cvar_alpha_one_is_mean_and_tiny_alpha_is_max():
    losses = torch.rand(4, 37)
    torch.testing.assert_close(cvar_loss(losses, 1.0), losses.mean(-1))
    torch.testing.assert_close(cvar_loss(losses, 1e-6), losses.max(-1).values)


def test_cvar_per_model_alpha():
    losses = torch.rand(3, 25, dtype=torch.float64)
    alpha = torch.tensor([0.1, 0.37, 1.0], dtype=torch.float64)
    got = cvar_loss(losses, alpha)
    assert got.shape == (3,)
    for k in range(3):
        assert got[k].item() == pytest.approx(brute_cvar(losses[k].numpy(), alpha[k].item()), rel=1e-10)
        assert got[k].item() == pytest.approx(cvar_loss(losses[k], alpha[k].item()).item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 0.23])  # alpha n = 8 (whole) and 9.2 (fractional)
def test_cvar_gradient_only_on_worst_samples(alpha):
    n = 40
    losses = torch.rand(n, dtype=torch.float64).requires_grad_()
    cvar_loss(losses, alpha).backward()
    grad = losses.grad
    assert torch.isfinite(grad).all()
    budget = alpha * n
    rank = torch.empty(n, dtype=torch.long)
    rank[losses.detach().argsort(descending=True)] = torch.arange(n)
    want = (budget - rank.double()).clamp(0, 1) / budget  # 1/(alpha n) on the worst, rest 0
    torch.testing.assert_close(grad, want)
    assert (grad[rank >= math.ceil(budget)] == 0).all()
    assert (grad > 0).sum() == math.ceil(budget)


@pytest.mark.parametrize("kind", ["logistic", "squared_hinge"])
def test_pairwise_auc_matches_double_loop(kind):
    torch.manual_seed(0)
    logits = torch.randn(4, 11, dtype=torch.float64) * 3
    labels = (torch.rand(4, 11) < 0.4).long()
    labels[2] = 1  # one model with a single-class batch
    got = pairwise_auc_loss(logits, labels, kind=kind, margin=0.7)
    assert got.shape == (4,)
    for k in range(4):
        want = brute_auc(logits[k].tolist(), labels[k].tolist(), kind, margin=0.7)
        assert got[k].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert got[2].item() == 0.0
    flat = pairwise_auc_loss(logits[0], labels[0], kind=kind, margin=0.7)  # plain [B] input
    assert flat.shape == () and flat.item() == pytest.approx(got[0].item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["logistic", "squared_hinge"])
def test_pairwise_auc_one_class_is_zero_with_zero_grad(kind):
    for label in (0, 1):
        logits = (torch.randn(2, 9) * 50).requires_grad_()
        loss = pairwise_auc_loss(logits, torch.full((2, 9), label), kind=kind)
        assert (loss == 0).all()
        loss.sum().backward()
        assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_pairwise_auc_models_are_independent():
    torch.manual_seed(1)
    logits = torch.randn(3, 10, requires_grad=True)
    labels = torch.tensor([[1, 0] * 5] * 3)
    for k in range(3):
        (grad,) = torch.autograd.grad(pairwise_auc_loss(logits, labels)[k], logits)
        others = [j for j in range(3) if j != k]
        assert (grad[others] == 0).all() and (grad[k] != 0).any()


def test_vs_logits_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    y = torch.tensor([[1, 0, 1], [0, 0, 1]])
    got = vs_logits(z, y, delta_fake=0.8, delta_real=1.2, iota_fake=-0.1, iota_real=0.3)
    want = [
        [0.8 * 2.0 + 0.1, 1.2 * -1.0 - 0.3, 0.8 * 0.5 + 0.1],
        [1.2 * 0.0 - 0.3, 1.2 * 3.0 - 0.3, 0.8 * -2.0 + 0.1],
    ]
    torch.testing.assert_close(got, torch.tensor(want))
    defaults = vs_logits(z, y, scale=10.0)
    torch.testing.assert_close(defaults[0, 0], torch.tensor(10.0 * (0.9 * 2.0 + 0.05)))
    torch.testing.assert_close(defaults[0, 1], torch.tensor(10.0 * (1.1 * -1.0 - 0.05)))


def hand_bce(z: float, y: int) -> float:
    p = 1.0 / (1.0 + math.exp(-z))
    return -math.log(p) if y == 1 else -math.log(1.0 - p)


def hand_cvar(values: list[float], alpha: float) -> float:
    worst, budget = sorted(values, reverse=True), alpha * len(values)
    return sum(min(max(budget - j, 0.0), 1.0) * v for j, v in enumerate(worst)) / budget


@pytest.mark.parametrize("loss", ["bce", "vs"])
def test_head_loss_by_hand(loss):
    torch.manual_seed(2)
    logits = torch.randn(3, 12, dtype=torch.float64) * 2
    labels = (torch.rand(3, 12) < 0.5).long()
    labels[:, 0], labels[:, 1] = 1, 0
    alpha = torch.tensor([1.0, 0.3, 0.55], dtype=torch.float64)
    gamma = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    vs = dict(delta_fake=0.7, delta_real=1.3, iota_fake=-0.2, iota_real=0.1)
    got = head_loss(
        logits, labels, alpha=alpha, gamma=gamma, loss=loss, auc_kind="squared_hinge", loss_options=vs
    )
    assert got.shape == (3,)
    for k in range(3):
        z, y = logits[k].tolist(), labels[k].tolist()
        if loss == "vs":
            z_adj = [(0.7 * zi + 0.2) if yi == 1 else (1.3 * zi - 0.1) for zi, yi in zip(z, y)]
        else:
            z_adj = z
        per = [hand_bce(zi, yi) for zi, yi in zip(z_adj, y)]
        want = hand_cvar(per, alpha[k].item()) + gamma[k].item() * brute_auc(z, y, "squared_hinge")
        assert got[k].item() == pytest.approx(want, rel=1e-9)
    # Plain [B] input with float hyperparameters gives a scalar; gamma=0 is just the CVaR.
    flat = head_loss(logits[1], labels[1], alpha=0.3, gamma=0.5, auc_kind="squared_hinge")
    if loss == "bce":
        assert flat.shape == () and flat.item() == pytest.approx(got[1].item(), rel=1e-12)
    erm = head_loss(logits[0], labels[0])
    torch.testing.assert_close(erm, bce_per_sample(logits[0], labels[0]).mean())


def test_head_loss_per_model_vs_and_margin_tensors():
    # The trainer passes per-model VS parameters as [K, 1] and the margin as [K, 1, 1].
    torch.manual_seed(5)
    logits, labels = torch.randn(3, 10, dtype=torch.float64), (torch.rand(3, 10) < 0.5).long()
    labels[:, 0] = 1 - labels[:, 1]
    vs_rows = [
        dict(delta_fake=0.8 + 0.1 * k, delta_real=1.2, iota_fake=-0.1 * k, iota_real=0.05, scale=1.0 + 4 * k)
        for k in range(3)
    ]
    vs = {name: torch.tensor([[row[name]] for row in vs_rows], dtype=torch.float64) for name in vs_rows[0]}
    margin = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    common = dict(alpha=0.4, gamma=1.5, loss="vs", auc_kind="squared_hinge")
    got = head_loss(logits, labels, auc_options={"margin": margin[:, None, None]}, loss_options=vs, **common)
    for k in range(3):
        want = head_loss(logits[k], labels[k], auc_options={"margin": margin[k].item()}, loss_options=vs_rows[k],
                         **common)
        assert got[k].item() == pytest.approx(want.item(), rel=1e-12)


# --- the registries and the Objective the trainer calls ----------------------------------------


def test_registries_are_the_config_choices_and_read_real_fields():
    assert set(PER_SAMPLE_LOSSES) == set(CHOICES["loss"])
    assert set(AUC_TERMS) == set(CHOICES["auc_kind"])
    for entry in (*PER_SAMPLE_LOSSES.values(), *AUC_TERMS.values()):
        assert set(entry.options.values()) <= set(FIELDS), entry
        assert isinstance(entry.doc, str) and entry.doc


def test_unknown_kinds_are_value_errors():
    z, y = torch.zeros(4), torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match="per-sample loss 'focal'"):
        head_loss(z, y, loss="focal")
    with pytest.raises(ValueError, match="AUC loss kind 'hinge'"):
        pairwise_auc_loss(z, y, "hinge")


def _batch(k: int = 4, b: int = 16, seed: int = 3):
    torch.manual_seed(seed)
    logits, labels = torch.randn(k, b) * 2, (torch.rand(b) < 0.5).long()
    labels[:2] = torch.tensor([1, 0])
    return logits, labels.expand(k, -1)


@pytest.mark.parametrize("loss,auc_kind", [("bce", "logistic"), ("vs", "squared_hinge")])
def test_objective_reads_each_models_config(loss, auc_kind):
    """Model k of an Objective is head_loss with model k's own settings, read from the fields
    its loss and AUC kind declare."""
    cfgs = [make_config(loss=loss, auc_kind=auc_kind, cvar_alpha=a, auc_gamma=g, auc_margin=m, vs_delta_fake=d,
                        vs_scale=sc)
            for a, g, m, d, sc in ((1.0, 0.0, 1.0, 0.9, 10.0), (0.3, 0.5, 0.5, 0.7, 1.0), (0.5, 2.0, 2.0, 1.0, 5.0),
                                   (0.2, 0.0, 1.5, 0.8, 2.0))]
    logits, labels = _batch()
    got = Objective(cfgs)(logits, labels)
    for k, c in enumerate(cfgs):
        own = {kw: getattr(c, f) for kw, f in PER_SAMPLE_LOSSES[loss].options.items()}
        pair = {kw: getattr(c, f) for kw, f in AUC_TERMS[auc_kind].options.items()}
        want = head_loss(logits[k], labels[k], alpha=c.cvar_alpha, gamma=c.auc_gamma, loss=loss, auc_kind=auc_kind,
                         loss_options=own, auc_options=pair)
        assert got[k].item() == pytest.approx(want.item(), rel=1e-6)


def test_objective_pays_for_pairs_only_where_gamma_is_positive(monkeypatch):
    """Mixed gamma: the pair term runs on the gamma > 0 models only, with exactly the loss of the
    full computation; all gamma = 0: no pair term at all."""
    import dfclip.heads.losses as L

    gammas = (0.0, 0.5, 0.0, 2.0)
    cfgs = [make_config(auc_kind="squared_hinge", auc_gamma=g, auc_margin=0.5 + i) for i, g in enumerate(gammas)]
    logits, labels = _batch()
    full = head_loss(logits, labels, gamma=torch.tensor(gammas), auc_kind="squared_hinge",
                     auc_options={"margin": torch.tensor([0.5, 1.5, 2.5, 3.5])[:, None, None]})
    seen = []
    real = L.pairwise_auc_loss
    monkeypatch.setattr(L, "pairwise_auc_loss", lambda z, *a, **kw: seen.append(z.shape[0]) or real(z, *a, **kw))
    assert torch.equal(Objective(cfgs)(logits, labels), full)
    assert seen == [2]
    seen.clear()
    off = [make_config(auc_gamma=0.0, cvar_alpha=a) for a in (1.0, 0.5)]
    Objective(off)(logits[:2], labels[:2])
    assert seen == []


@pytest.mark.parametrize("kind", sorted(AUC_TERMS))
def test_shared_labels_give_the_per_model_losses(kind):
    """One [B] label vector for every model (a sweep's shared batch: the gathered pair path on a
    CPU) gives each loss exactly what the same labels repeated as [K, B] give, gradients included."""
    torch.manual_seed(3)
    labels = (torch.rand(13) < 0.3).long()
    logits = (torch.randn(4, 13, dtype=torch.float64) * 3).requires_grad_()
    repeated = labels.expand(4, -1).clone()
    margin = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)[:, None, None]
    shared = pairwise_auc_loss(logits, labels, kind=kind, margin=margin)
    dense = pairwise_auc_loss(logits, repeated, kind=kind, margin=margin)
    torch.testing.assert_close(shared, dense, rtol=1e-12, atol=1e-12)
    for k in range(4):
        want = brute_auc(logits[k].tolist(), labels.tolist(), kind, margin=0.5 + 0.5 * k)
        assert shared[k].item() == pytest.approx(want, rel=1e-10)
    g_shared, = torch.autograd.grad(shared.sum(), logits)
    g_dense, = torch.autograd.grad(dense.sum(), logits)
    torch.testing.assert_close(g_shared, g_dense, rtol=1e-12, atol=1e-12)
    one_class = pairwise_auc_loss(logits, torch.ones(13, dtype=torch.long), kind=kind)
    assert (one_class == 0).all()
    gammas = torch.tensor([0.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    rows = torch.tensor([1, 3])
    for loss in ("bce", "vs"):
        torch.testing.assert_close(head_loss(logits, labels, alpha=0.3, gamma=gammas, loss=loss, auc_kind=kind,
                                             auc_rows=rows),
                                   head_loss(logits, repeated, alpha=0.3, gamma=gammas, loss=loss, auc_kind=kind))
    for mode in SP_CUP_MODES:
        torch.testing.assert_close(sp_cup_loss(logits, labels, mode), sp_cup_loss(logits, repeated, mode))
