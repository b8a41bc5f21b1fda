"""heads.losses checked against definitions: brute-force CVaR, explicit pair loops, hand maths."""

import math

import numpy as np
import pytest
import torch

from dfclip.heads.losses import (
    bce_per_sample,
    check_loss_args,
    cvar_loss,
    head_loss,
    pairwise_auc_loss,
    vs_logits,
)
from dfclip.errors import UserError


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
                total += math.log1p(math.exp(-d)) if kind == "logistic" else max(0.0, margin - d) ** 2
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


@pytest.mark.parametrize("per_sample", ["bce", "vs"])
def test_head_loss_by_hand(per_sample):
    torch.manual_seed(2)
    logits = torch.randn(3, 12, dtype=torch.float64) * 2
    labels = (torch.rand(3, 12) < 0.5).long()
    labels[:, 0], labels[:, 1] = 1, 0
    alpha = torch.tensor([1.0, 0.3, 0.55], dtype=torch.float64)
    gamma = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    vs = dict(delta_fake=0.7, delta_real=1.3, iota_fake=-0.2, iota_real=0.1)
    got = head_loss(
        logits, labels, alpha=alpha, gamma=gamma, per_sample=per_sample, auc_kind="squared_hinge", vs=vs
    )
    assert got.shape == (3,)
    for k in range(3):
        z, y = logits[k].tolist(), labels[k].tolist()
        if per_sample == "vs":
            z_adj = [(0.7 * zi + 0.2) if yi == 1 else (1.3 * zi - 0.1) for zi, yi in zip(z, y)]
        else:
            z_adj = z
        per = [hand_bce(zi, yi) for zi, yi in zip(z_adj, y)]
        want = hand_cvar(per, alpha[k].item()) + gamma[k].item() * brute_auc(z, y, "squared_hinge")
        assert got[k].item() == pytest.approx(want, rel=1e-9)
    # Plain [B] input with float hyperparameters gives a scalar; gamma=0 is just the CVaR.
    flat = head_loss(logits[1], labels[1], alpha=0.3, gamma=0.5, auc_kind="squared_hinge")
    if per_sample == "bce":
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
    common = dict(alpha=0.4, gamma=1.5, per_sample="vs", auc_kind="squared_hinge")
    got = head_loss(logits, labels, margin=margin[:, None, None], vs=vs, **common)
    for k in range(3):
        want = head_loss(logits[k], labels[k], margin=margin[k].item(), vs=vs_rows[k], **common)
        assert got[k].item() == pytest.approx(want.item(), rel=1e-12)


def test_check_loss_args():
    check_loss_args(1.0, 0.0)
    check_loss_args([0.05, 0.5, 1.0], torch.tensor([0.0, 3.0]), per_sample="vs", auc_kind="squared_hinge")
    for alpha in (0.0, -0.1, 1.5, float("nan"), [0.5, 1.2]):
        with pytest.raises(UserError, match="alpha"):
            check_loss_args(alpha, 0.0)
    for gamma in (-1.0, [0.0, -0.5], float("nan")):
        with pytest.raises(UserError, match="gamma"):
            check_loss_args(0.5, gamma)
    with pytest.raises(UserError, match="per-sample"):
        check_loss_args(0.5, 0.0, per_sample="focal")
    with pytest.raises(UserError, match="AUC"):
        check_loss_args(0.5, 0.0, auc_kind="hinge")
