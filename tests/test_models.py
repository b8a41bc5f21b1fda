"""Batched heads vs independent torch reference modules (nn.Linear, nn.BatchNorm1d, nn.Dropout)."""

import json

import pytest
import torch
from torch import nn

from dfclip.heads.config import CHOICES, FIELDS, make_config
from dfclip.heads.models import (HEAD_KINDS, BatchedLinear, BatchedLinearLayer, BatchedMLP, build_head,
                                 head_from_config, head_options)
from dfclip.errors import UserError
from dfclip.heads.mlp_layer import HiddenLayer, keep_mask

D, H, DEPTH = 12, 10, 3


def reference_mlp(dim: int, hidden: int, depth: int, p: float) -> nn.Sequential:
    layers, width = [], dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(hidden, 1))


def references_from(model: BatchedMLP) -> list[nn.Sequential]:
    """One reference MLP per batched model, loaded with that model's weights and BN buffers."""
    refs = []
    for k in range(model.k):
        ref = reference_mlp(model.dim, model.hidden, model.depth, model.dropout)
        with torch.no_grad():
            for i, (lin, bn) in enumerate(zip(model.linears, model.norms)):
                ref[4 * i].weight.copy_(lin.weight[k])
                ref[4 * i].bias.copy_(lin.bias[k])
                ref[4 * i + 1].weight.copy_(bn.weight[k])
                ref[4 * i + 1].bias.copy_(bn.bias[k])
                ref[4 * i + 1].running_mean.copy_(bn.running_mean[k])
                ref[4 * i + 1].running_var.copy_(bn.running_var[k])
            ref[-1].weight.copy_(model.out.weight[k])
            ref[-1].bias.copy_(model.out.bias[k])
        refs.append(ref)
    return refs


def randomised_mlp(k: int, dropout: float = 0.0) -> BatchedMLP:
    """A batched MLP whose biases, BN affine params and running stats are not at their defaults."""
    torch.manual_seed(0)
    model = BatchedMLP(k, D, hidden=H, depth=DEPTH, dropout=dropout, seeds=range(100, 100 + k))
    with torch.no_grad():
        for lin in [*model.linears, model.out]:
            lin.bias.normal_()
        for bn in model.norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model


def test_mlp_train_mode_matches_independent_references():
    model = randomised_mlp(3).train()
    refs = [r.train() for r in references_from(model)]
    x = torch.randn(3, 16, D)
    out = model(x)
    assert out.shape == (3, 16)
    for k, ref in enumerate(refs):
        torch.testing.assert_close(out[k], ref(x[k]).squeeze(-1), atol=1e-5, rtol=1e-5)
        for i, bn in enumerate(model.norms):
            torch.testing.assert_close(bn.running_mean[k], ref[4 * i + 1].running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bn.running_var[k], ref[4 * i + 1].running_var, atol=1e-5, rtol=1e-5)

    # Gradients of every parameter, through a loss that weights models and rows differently.
    w = torch.randn(3, 16)
    (out * w).sum().backward()
    for k, ref in enumerate(refs):
        (ref(x[k]).squeeze(-1) * w[k]).sum().backward()
        for i, (lin, bn) in enumerate(zip(model.linears, model.norms)):
            for got, want in [
                (lin.weight.grad[k], ref[4 * i].weight.grad),
                (lin.bias.grad[k], ref[4 * i].bias.grad),
                (bn.weight.grad[k], ref[4 * i + 1].weight.grad),
                (bn.bias.grad[k], ref[4 * i + 1].bias.grad),
            ]:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.out.weight.grad[k], ref[-1].weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.out.bias.grad[k], ref[-1].bias.grad, atol=1e-5, rtol=1e-5)


def test_mlp_eval_mode_matches_references_and_uses_running_stats():
    model = randomised_mlp(3).eval()
    refs = [r.eval() for r in references_from(model)]
    x = torch.randn(3, 7, D)
    out = model(x)
    for k, ref in enumerate(refs):
        torch.testing.assert_close(out[k], ref(x[k]).squeeze(-1), atol=1e-5, rtol=1e-5)
    # Eval output of one row does not depend on the rest of the batch (running stats, not batch stats).
    torch.testing.assert_close(model(x[:, :1]), out[:, :1])


def test_mlp_eval_mode_gradients_match_references():
    """Eval mode folds Linear + BatchNorm into one affine per column; gradients still reach every
    parameter as through the modules (e.g. for saliency on a trained head)."""
    model = randomised_mlp(2).eval()
    refs = [r.eval() for r in references_from(model)]
    x = torch.randn(2, 7, D)
    w = torch.randn(2, 7)
    (model(x) * w).sum().backward()
    for k, ref in enumerate(refs):
        (ref(x[k]).squeeze(-1) * w[k]).sum().backward()
        for i, (lin, bn) in enumerate(zip(model.linears, model.norms)):
            for got, want in [(lin.weight.grad[k], ref[4 * i].weight.grad), (lin.bias.grad[k], ref[4 * i].bias.grad),
                              (bn.weight.grad[k], ref[4 * i + 1].weight.grad),
                              (bn.bias.grad[k], ref[4 * i + 1].bias.grad)]:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shared_input_equals_expanded_input():
    for model in (randomised_mlp(3), BatchedLinear(3, D, seeds=[1, 2, 3])):
        x = torch.randn(9, D)
        for mode in (True, False):
            model.train(mode)
            torch.testing.assert_close(model(x, update_stats=False), model(x.expand(3, 9, D), update_stats=False))


def test_update_stats_false_keeps_buffers_and_output():
    model = randomised_mlp(2).train()
    x = torch.randn(2, 8, D)
    before = {name: b.clone() for name, b in model.named_buffers()}
    out_frozen = model(x, update_stats=False)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, before[name], atol=0, rtol=0)
    out = model(x)
    torch.testing.assert_close(out_frozen, out, atol=0, rtol=0)
    assert any(not torch.equal(b, before[name]) for name, b in model.named_buffers())


def test_init_is_kaiming_uniform_per_seed_and_independent_of_k():
    seeds = [10, 11, 12, 13, 14]
    batch = BatchedMLP(5, D, hidden=H, seeds=seeds)
    alone = BatchedMLP(1, D, hidden=H, seeds=[12])
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(batch.state_dict()[name][2], tensor[0], atol=0, rtol=0)
    # The reference recipe: kaiming_uniform_ (fan_in, relu) on each Linear weight, then nn.Linear's default bias, in order from one seeded generator.
    ref = reference_mlp(D, H, 3, 0.0)
    g = torch.Generator().manual_seed(12)
    for layer in ref:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, mode="fan_in", nonlinearity="relu", generator=g)
            bound = 1.0 / layer.weight.shape[1] ** 0.5
            nn.init.uniform_(layer.bias, -bound, bound, generator=g)
    got = references_from(alone)[0]
    for (name, want), have in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(have, want, atol=0, rtol=0, msg=name)
    assert not torch.equal(batch.linears[0].weight[0], batch.linears[0].weight[1])
    # Same for the linear probe.
    probe_batch, probe_alone = BatchedLinear(3, D, seeds=[4, 5, 6]), BatchedLinear(1, D, seeds=[5])
    torch.testing.assert_close(probe_batch.linear.weight[1], probe_alone.linear.weight[0], atol=0, rtol=0)


def test_select_round_trip():
    model = randomised_mlp(4).eval()
    x = torch.randn(4, 6, D)
    picked = model.select([3, 1])
    assert isinstance(picked, BatchedMLP) and picked.k == 2 and not picked.training
    assert picked.seeds == [model.seeds[3], model.seeds[1]]
    for name, tensor in picked.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name][[3, 1]], atol=0, rtol=0)
    torch.testing.assert_close(picked(x[[3, 1]]), model(x)[[3, 1]])
    # Saved as config + state_dict, it rebuilds into the same model.
    config = json.loads(json.dumps(picked.config))
    rebuilt = head_from_config(config, 2)
    rebuilt.load_state_dict(picked.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x[[3, 1]]), picked(x[[3, 1]]))

    probe = BatchedLinear(3, D, seeds=[0, 1, 2])
    one = probe.select([2])
    assert isinstance(one, BatchedLinear) and one.k == 1 and one.config == {"kind": "linear", "dim": D}
    torch.testing.assert_close(one(x[2:3]), probe(x[:3])[2:])


def test_dropout_masks_differ_across_models():
    model = randomised_mlp(1, dropout=0.5).select([0, 0, 0])  # three identical models
    x = torch.randn(32, D)  # the same batch for all three
    model.eval()
    out = model(x)
    torch.testing.assert_close(out[0], out[1])
    model.train()
    out = model(x, update_stats=False)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_dropout_generators_per_model_are_independent_of_k():
    model3 = randomised_mlp(3, dropout=0.5).train()
    model1 = model3.select([1])
    x = torch.randn(3, 16, D)
    out3 = model3(x, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    out1 = model1(x[1:2], generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(out3[1], out1[0])
    again = model3(x, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    torch.testing.assert_close(out3, again)


def test_keep_mask_rate_values_and_streams():
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    mask = keep_mask(500, 100, 0.3, gens, [0, 1, 2, 1], torch.float32, torch.device("cpu"))
    assert mask.shape == (500, 4, 100) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - mask.mean().item() - 0.3) < 0.01
    torch.testing.assert_close(mask[:, 1], mask[:, 3], atol=0, rtol=0)  # one generator, one draw
    assert not torch.equal(mask[:, 0], mask[:, 1])
    # Model k's mask is its generator's own draw, whatever else is drawn alongside.
    alone = keep_mask(500, 100, 0.3, [torch.Generator().manual_seed(1)], [0], torch.float32, torch.device("cpu"))
    assert alone.shape == (500, 1, 100)
    torch.testing.assert_close(alone[:, 0], mask[:, 1], atol=0, rtol=0)
    # The drop probability is p to 16 bits, at the extremes too.
    for p in (1e-4, 0.5, 0.9999):
        m = keep_mask(4000, 1000, p, [torch.Generator().manual_seed(5)], [0], torch.bfloat16, torch.device("cpu"))
        assert m.dtype == torch.bfloat16
        assert abs(1 - m.float().mean().item() - p) < 5e-3


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_hidden_layer_is_linear_batchnorm_relu_dropout_with_their_gradients(shared, dtype):
    """HiddenLayer against its definition, written with the modules' maths and autograd: the output,
    the running statistics and the gradient of every input, for K = 3, a shared or per-model input,
    in float64 (exact) and in bf16 (to bf16's precision)."""
    k, b, fan_in, width, p = 3, 16, D, H, 0.4
    torch.manual_seed(0)
    params = [torch.randn(k, width, fan_in, dtype=torch.float64) / fan_in**0.5, torch.randn(k, width, dtype=torch.float64),
              torch.rand(k, width, dtype=torch.float64) + 0.5, torch.randn(k, width, dtype=torch.float64)]
    h = torch.randn(*(() if shared else (k,)), b, fan_in, dtype=torch.float64)
    keep = (torch.rand(b, k, width) > p).to(torch.float64)
    stats = [torch.randn(k, width, dtype=torch.float64), torch.rand(k, width, dtype=torch.float64) + 0.5]

    def definition(h, weight, bias, gamma, beta):
        z = (h.expand(k, b, fan_in) @ weight.transpose(1, 2)) + bias[:, None, :]  # [K, B, H]
        mean, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
        y = torch.relu((z - mean) / torch.sqrt(var + 1e-5) * gamma[:, None] + beta[:, None])
        return y * keep.transpose(0, 1) / (1 - p), mean.squeeze(1), z.var(1, unbiased=True)

    want_params = [t.clone().requires_grad_() for t in params]
    want_h = h.clone().requires_grad_()
    want, mean, var = definition(want_h, *want_params)
    upstream = torch.randn(k, b, width, dtype=torch.float64)
    (want * upstream).sum().backward()

    # float32 parameters under bf16, as in training (torch's mixed-dtype batch norm wants float32)
    got_params = [t.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_() for t in params]
    got_h = h.to(dtype).requires_grad_()
    running = [t.to(got_params[0].dtype, copy=True) for t in stats]
    got = HiddenLayer.apply(got_h, *got_params, keep.to(dtype), 1 / (1 - p), 1e-5, *running, 0.1)
    assert got.shape == (k, b, width) and got.dtype == dtype
    (got.double() * upstream).sum().backward()
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(running[0].double(), 0.9 * stats[0] + 0.1 * mean.detach(), **tol)
    torch.testing.assert_close(running[1].double(), 0.9 * stats[1] + 0.1 * var.detach(), **tol)
    for name, g, w in zip(["h", "weight", "bias", "bn weight", "bn bias"], [got_h, *got_params], [want_h, *want_params]):
        assert g.grad.dtype == g.dtype, name
        scale = w.grad.abs().max().clamp(min=1.0)  # the bias gradient is 0 up to rounding (BatchNorm cancels it)
        torch.testing.assert_close(g.grad.double() / scale, w.grad / scale, **tol, msg=name)


def test_linear_head_matches_nn_linear():
    probe = BatchedLinear(3, D, seeds=[0, 1, 2])
    with torch.no_grad():
        probe.linear.bias.normal_()
    x = torch.randn(3, 5, D)
    out = probe(x)
    w = torch.randn(3, 5)
    (out * w).sum().backward()
    for k in range(3):
        ref = nn.Linear(D, 1)
        with torch.no_grad():
            ref.weight.copy_(probe.linear.weight[k])
            ref.bias.copy_(probe.linear.bias[k])
        want = ref(x[k]).squeeze(-1)
        torch.testing.assert_close(out[k], want)
        (want * w[k]).sum().backward()
        torch.testing.assert_close(probe.linear.weight.grad[k], ref.weight.grad)
        torch.testing.assert_close(probe.linear.bias.grad[k], ref.bias.grad)


def test_build_head_and_errors():
    mlp = build_head("mlp", 2, D, [0, 1], hidden=6, depth=2, dropout=0.1)
    assert isinstance(mlp, BatchedMLP)
    assert mlp.config == {"kind": "mlp", "dim": D, "hidden": 6, "depth": 2, "dropout": 0.1}
    assert mlp(torch.randn(2, 4, D)).shape == (2, 4)
    assert build_head("mlp", 1, D, [0]).hidden == D  # hidden defaults to the embedding dim
    with pytest.raises(UserError, match="mlp, linear"):
        build_head("transformer", 1, D, [0])
    with pytest.raises(UserError, match="hidden"):
        build_head("linear", 1, D, [0], hidden=4)
    with pytest.raises(UserError, match="dropout"):
        build_head("mlp", 1, D, [0], dropout=1.0)
    with pytest.raises(ValueError, match="one seed per model"):
        build_head("mlp", 2, D, [0])


@pytest.mark.parametrize("name", sorted(HEAD_KINDS))
def test_head_kinds_are_the_config_choices_and_declare_their_true_sizes(name):
    """Every RunConfig head choice is a registered kind; its options are RunConfig fields that
    build it, and its declared sizes are those of the module it builds."""
    assert set(HEAD_KINDS) == set(CHOICES["head"])
    kind = HEAD_KINDS[name]
    assert set(kind.options) <= set(FIELDS)
    extra = {"feature": "block1+block2"} if name == "layermix" else {}  # it mixes two or more blocks
    opts = head_options(make_config(head=name, hidden=6, depth=2, dropout=0.1, **extra))
    assert set(opts) == set(kind.options)
    head = build_head(name, 1, D, [0], **opts)
    assert head_from_config(head.config, 1).config == head.config
    assert kind.params(D, **opts) == sum(t.numel() for t in head.state_dict().values())
    # Every linear layer's output width (its fan_out), and the logits' shape from a real forward.
    widths = [m.weight.shape[1] for m in head.modules() if isinstance(m, BatchedLinearLayer)]
    assert head.eval()(torch.randn(5, D)).shape == (1, 5) and widths[-1] == 1
    assert kind.activations(D, **opts) == sum(widths)
    assert kind.width(D, **opts) == max(widths)
