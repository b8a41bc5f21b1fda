"""heads.optim: BatchedAdamW vs K separate torch AdamW, SAM / ASAM vs steps computed by hand."""

import contextlib
import io
from unittest import mock

import pytest
import torch

from dfclip.heads.losses import head_loss
from dfclip.heads.optim import SAM, BatchedAdamW

K = 3


def make_params(dtype=torch.float32):
    torch.manual_seed(0)
    weight = torch.randn(K, 4, 5, dtype=dtype, requires_grad=True)
    return [weight, torch.randn(K, 4, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("lr,wd", [([1e-2, 3e-3, 5e-2], [0.0, 0.1, 0.5]),  # every model its own kernel call
                                   ([1e-2, 1e-2, 5e-2], [0.1, 0.1, 0.1])])  # models 0 and 1 as one block
def test_batched_adamw_matches_k_torch_adamw(lr, wd):
    lr, wd = torch.tensor(lr), torch.tensor(wd)
    batched = make_params()
    opt = BatchedAdamW(batched, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    singles = [[p[k].detach().clone().requires_grad_() for p in batched] for k in range(K)]
    refs = [
        torch.optim.AdamW(singles[k], lr=lr[k].item(), betas=(0.8, 0.95), eps=1e-6, weight_decay=wd[k].item())
        for k in range(K)
    ]
    for step, lr_scale in enumerate([1.0, 0.5, 1.0, 0.25, 0.8, 1.0]):
        grads = [torch.randn_like(p) for p in batched]
        if step == 2:
            grads[1] = None  # a parameter without gradient is skipped, as in torch
        for p, g in zip(batched, grads):
            p.grad = g
        opt.step(lr_scale=lr_scale)
        for k in range(K):
            for p, g in zip(singles[k], grads):
                p.grad = None if g is None else g[k].clone()
            refs[k].param_groups[0]["lr"] = lr[k].item() * lr_scale
            refs[k].step()
    for k in range(K):
        for p, q in zip(batched, singles[k]):
            torch.testing.assert_close(p[k].detach(), q.detach(), rtol=0, atol=1e-6)


def test_batched_adamw_state_dict_roundtrip_and_zero_grad():
    params_a = make_params()
    params_b = [p.detach().clone().requires_grad_() for p in params_a]
    opt_a = BatchedAdamW(params_a, lr=torch.tensor([1e-2, 2e-2, 3e-2]), weight_decay=0.05)
    grads = [[torch.randn_like(p) for p in params_a] for _ in range(4)]

    def run(opt, params, steps):
        for g in steps:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    run(opt_a, params_a, grads[:2])
    with torch.no_grad():
        for p, q in zip(params_b, params_a):
            p.copy_(q)
    opt_b = BatchedAdamW(params_b, lr=1.0, weight_decay=0.0)  # hyperparameters come from the state
    checkpoint = io.BytesIO()  # through a file, as the trainer will: no tensors shared with opt_a
    torch.save(opt_a.state_dict(), checkpoint)
    checkpoint.seek(0)
    opt_b.load_state_dict(torch.load(checkpoint, weights_only=True))
    run(opt_a, params_a, grads[2:])
    run(opt_b, params_b, grads[2:])
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # zero_grad() zeroes the one gradient buffer in place (backward accumulates into it); set_to_none as torch
    grads_before = [p.grad for p in params_b]
    opt_b.zero_grad()
    assert all(p.grad is g and not p.grad.any() for p, g in zip(params_b, grads_before))
    opt_b.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params_b)


def test_batched_adamw_rejects_mismatched_models():
    with pytest.raises(ValueError, match="leading model dim"):
        BatchedAdamW([torch.zeros(3, 2, requires_grad=True), torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="K=3"):
        BatchedAdamW([torch.zeros(3, 2, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))


def quadratic_problem():
    """K models, each with f_k(theta, phi) = 1/2 theta^T A_k theta + 1/2 phi^T B_k phi."""
    torch.manual_seed(3)
    a = torch.randn(K, 4, 4, dtype=torch.float64)
    b = torch.randn(K, 2, 2, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + torch.eye(4, dtype=torch.float64)
    b = b @ b.transpose(1, 2) + torch.eye(2, dtype=torch.float64)
    theta = torch.randn(K, 4, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(K, 2, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        quad = "ki,kij,kj->k"
        return (0.5 * torch.einsum(quad, theta, a, theta) + 0.5 * torch.einsum(quad, phi, b, phi)).sum()

    return a, b, theta, phi, loss


def hand_sam_step(a, b, theta, phi, rho, adaptive):
    """From the definition: the gradients at (theta, phi) + eps, per model, and eps on theta."""
    theta, phi = theta.detach().clone(), phi.detach().clone()
    g_theta = torch.einsum("kij,kj->ki", a, theta)
    g_phi = torch.einsum("kij,kj->ki", b, phi)
    t_theta = theta.abs() if adaptive else torch.ones_like(theta)
    t_phi = phi.abs() if adaptive else torch.ones_like(phi)
    norm = ((t_theta * g_theta).square().sum(1) + (t_phi * g_phi).square().sum(1)).sqrt()  # [K]
    eps_theta = rho[:, None] * t_theta**2 * g_theta / norm[:, None]
    eps_phi = rho[:, None] * t_phi**2 * g_phi / norm[:, None]
    g_theta_adv = torch.einsum("kij,kj->ki", a, theta + eps_theta)
    g_phi_adv = torch.einsum("kij,kj->ki", b, phi + eps_phi)
    return g_theta_adv, g_phi_adv, eps_theta


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_sgd_base_matches_hand_step(adaptive):
    a, b, theta, phi, loss = quadratic_problem()
    rho = torch.tensor([0.05, 0.0, 0.3], dtype=torch.float64)
    lr = 0.1
    g_theta_adv, g_phi_adv, eps_theta = hand_sam_step(a, b, theta, phi, rho, adaptive)
    want_theta, want_phi = theta.detach() - lr * g_theta_adv, phi.detach() - lr * g_phi_adv
    start = theta.detach().clone()

    sam = SAM(torch.optim.SGD([theta, phi], lr=lr), rho=rho, adaptive=adaptive)
    loss().backward()
    sam.first_step()
    assert theta.grad is None and phi.grad is None
    torch.testing.assert_close(theta.detach() - start, eps_theta, rtol=1e-10, atol=1e-12)
    assert torch.equal(theta[1], start[1])  # rho = 0: exactly no perturbation
    loss().backward()
    sam.second_step()
    torch.testing.assert_close(theta.detach(), want_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(phi.detach(), want_phi, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(g_theta_adv[2], torch.einsum("ij,j->i", a[2], start[2]))  # rho matters


def test_sam_with_batched_adamw_base_forwards_lr_scale():
    # betas=(0, 0), no decay: AdamW's step is lr * g / (|g| + eps), easy to write by hand.
    a, b, theta, phi, loss = quadratic_problem()
    rho = torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    lr, lr_scale, eps = torch.tensor([0.1, 0.2, 0.05]), 0.5, 1e-8
    g_theta_adv, g_phi_adv, _ = hand_sam_step(a, b, theta, phi, rho, adaptive=False)
    step_lr = lr.double()[:, None] * lr_scale
    want_theta = theta.detach() - step_lr * g_theta_adv / (g_theta_adv.abs() + eps)
    want_phi = phi.detach() - step_lr * g_phi_adv / (g_phi_adv.abs() + eps)

    sam = SAM(BatchedAdamW([theta, phi], lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=0.0), rho=rho)
    loss().backward()
    sam.first_step()
    loss().backward()
    sam.second_step(lr_scale=lr_scale)
    torch.testing.assert_close(theta.detach(), want_theta, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(phi.detach(), want_phi, rtol=1e-7, atol=1e-9)
    assert not theta.grad.any()  # BatchedAdamW zeroes its gradient buffer in place


@contextlib.contextmanager
def no_host_reads():
    """Fail on any Python-level read of a tensor's value (each one is a GPU->host sync)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
        yield


def test_training_step_reads_no_tensor_values_on_host():
    torch.manual_seed(4)
    x, labels = torch.randn(K, 16, 5), (torch.rand(K, 16) < 0.5).long()
    weight, bias = torch.randn(K, 5, requires_grad=True), torch.zeros(K, requires_grad=True)
    lr, weight_decay = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.0, 0.1, 0.2])
    base = BatchedAdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    sam = SAM(base, rho=torch.tensor([0.0, 0.05, 0.1]), adaptive=True)
    hyper = dict(alpha=torch.tensor([0.1, 0.5, 1.0]), gamma=torch.tensor([0.0, 1.0, 2.0]), loss="vs")
    start = weight.detach().clone()
    with no_host_reads():
        for _ in range(2):
            head_loss(torch.einsum("kbd,kd->kb", x, weight) + bias[:, None], labels, **hyper).sum().backward()
            sam.first_step()
            head_loss(torch.einsum("kbd,kd->kb", x, weight) + bias[:, None], labels, **hyper).sum().backward()
            sam.second_step(lr_scale=0.5)
    assert not torch.equal(weight.detach(), start) and bias.abs().sum() > 0


def test_a_sam_adamw_step_is_a_few_ops_whatever_the_number_of_parameters():
    """The lean step: BatchedAdamW + SAM work on [K, P] buffers, so their op count does not grow with
    the parameter count (the per-parameter version issued ~13 ops per parameter and step)."""
    from torch.profiler import ProfilerActivity, profile

    from dfclip.heads.models import build_head

    def ops_of_one_step(depth: int) -> int:
        head = build_head("mlp", K, 16, seeds=[0, 1, 2], depth=depth, dropout=0.0)
        sam = SAM(BatchedAdamW(list(head.parameters()), lr=torch.tensor([1e-2, 3e-3, 5e-2])), rho=0.05)
        x = torch.randn(32, 16)
        for step in range(2):  # the second step is the steady state (no first-use allocations)
            head(x).square().sum().backward()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sam.first_step()
            head(x).square().sum().backward()
            with profile(activities=[ProfilerActivity.CPU]) as prof2:
                sam.second_step(lr_scale=0.5)
        events = [*prof.events(), *prof2.events()]

        def top_level(e) -> bool:
            parent = e.cpu_parent
            while parent is not None:
                if parent.name.startswith("aten::"):
                    return False
                parent = parent.cpu_parent
            return e.name.startswith("aten::")

        return sum(top_level(e) for e in events)

    shallow, deep = ops_of_one_step(1), ops_of_one_step(6)  # 8 vs 28 parameter tensors
    assert shallow == deep and deep <= 60, (shallow, deep)
