"""--cuda-graphs: the graph-captured training step (heads.graphs) trains exactly as the eager step.

On a CPU the capture is emulated (tests/graph_emulation.py): the step's aten ops are recorded once
and replayed without its Python, so a graphed fit equal to the eager fit shows that the step
is capture-safe: every per-step input in a device buffer, no host read, no branch on data, the
same shapes every step. On a GPU a real CUDA-graph fit is compared with the eager fit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dfclip.heads import graphs
from dfclip.heads import train as T
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data

from graph_emulation import CaptureUnsafe, EmulatedBackend

FIT = dict(epochs=3, lr=1e-2, batch_size=64, hidden=16, depth=2, precision="fp32", warmup_epochs=1.0)

CASES = {
    "mlp-sam-noise-cvar-auc": [dict(sam_rho=0.05, feature_noise=True, cvar_alpha=0.3, auc_gamma=0.5)],
    "sweep-k4-lr-seeds": [dict(lr=lr, seed=s, sam_rho=0.05) for lr in (1e-2, 3e-3) for s in (0, 1)],
    "sp_cup-schedule-short-batch": [dict(schedule="sp_cup", lr=1e-2, min_lr=1e-4, drop_last=False, epochs=4),
                                    dict(schedule="sp_cup", lr=3e-3, min_lr=1e-4, drop_last=False, epochs=4)],
    "linear-asam-l2": [dict(head="linear", sam_rho=0.05, sam_adaptive=True, l2_normalize=True)],
    "balanced-vs": [dict(balanced=True, fake_rate=0.5, loss="vs", auc_gamma=0.5, feature_noise=True)],
    "sp_cup-objective": [dict(objective="sp_cup:vs_cvar_auc", cvar_alpha=0.5, auc_gamma=0.5, sam_rho=0.05)],
}


@pytest.fixture(autouse=True)
def gpu_pair_loss(monkeypatch):
    """The AUC term as on a GPU: the CPU's shortcut finds the fakes and reals by reading the labels
    back (heads.losses._shared_label_pairs), which a captured step cannot; eager and graphed fits
    both use the masked pair matrix here, so they stay comparable bit for bit."""
    from dfclip.heads import losses

    monkeypatch.setattr(losses, "_shared_label_pairs", losses._masked_pairs)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from dfclip.store.synthetic import make_synthetic_store

    return make_synthetic_store(tmp_path_factory.mktemp("graphs") / "s", n=700, dim=16, signal=2, fake_rate=0.7,
                                seed=5)


def _fit(store_dir, cfgs, device="cpu", **kw):
    data = load_data(store_dir, cfgs[0], device=torch.device(device))
    lines: list[str] = []
    results, _ = T.train(data, cfgs, log=lines.append, **kw)
    return results, lines


def _assert_same(a, b, exact: bool = True) -> None:
    for ra, rb in zip(a, b):
        if exact:
            assert ra.history.drop("seconds").equals(rb.history.drop("seconds")), (ra.history, rb.history)
        sa, sb = ra.head.state_dict(), rb.head.state_dict()
        for name in sa:
            if exact:
                assert torch.equal(sa[name], sb[name]), name
            else:  # bf16 hidden layers: within bf16 round-off
                torch.testing.assert_close(sa[name].float(), sb[name].float(), rtol=1.6e-2, atol=2e-3)


@pytest.mark.parametrize("case", CASES)
def test_an_emulated_graphed_fit_is_the_eager_fit(monkeypatch, small_store, case):
    """Replaying the recorded step (no Python per step) gives the eager fit, bit for bit."""
    backend = EmulatedBackend()
    monkeypatch.setattr(graphs, "BACKEND", backend)
    cfgs = [make_config(**(FIT | over)) for over in CASES[case]]
    eager, _ = _fit(small_store, [dataclasses.replace(c, cuda_graphs="off") for c in cfgs])
    graphed, lines = _fit(small_store, [dataclasses.replace(c, cuda_graphs="on") for c in cfgs])
    assert backend.captures >= 1 and backend.replays > backend.captures, "no step was replayed"
    assert backend.warmups == graphs.WARMUP * backend.captures
    assert backend.static_shapes()  # the capture issues the ops of the warm-up step before it
    _assert_same(graphed, eager)
    assert not [line for line in lines if "CUDA graphs" in line]


def test_a_graphed_halving_sweep_captures_again_after_each_rung(monkeypatch, small_store):
    backend = EmulatedBackend()
    monkeypatch.setattr(graphs, "BACKEND", backend)
    cfgs = [make_config(**(FIT | dict(epochs=3, lr=lr, sam_rho=0.05))) for lr in (3e-2, 1e-2, 3e-3, 1e-3)]
    plan = T.Halving(eta=2, min_epochs=1)
    eager, _ = _fit(small_store, [dataclasses.replace(c, cuda_graphs="off") for c in cfgs], halving=plan)
    graphed, _ = _fit(small_store, [dataclasses.replace(c, cuda_graphs="on") for c in cfgs], halving=plan)
    assert backend.captures == len(plan.rungs(3))  # the kept models are a new batched head at each rung
    _assert_same(graphed, eager)


def test_the_emulation_catches_a_host_read_in_the_step(monkeypatch, small_store):
    """The check can fail: a loss that reads a value to the host is refused at the first warm-up step."""
    from dfclip.heads import losses

    monkeypatch.setattr(graphs, "BACKEND", EmulatedBackend())
    real_call = losses.Objective.__call__

    def reading_loss(self, logits, labels):
        loss = real_call(self, logits, labels)
        return loss * 2 if loss.sum() > 1e9 else loss  # a branch on a device value

    monkeypatch.setattr(losses.Objective, "__call__", reading_loss)
    with pytest.raises(CaptureUnsafe, match="host read"):
        _fit(small_store, [make_config(**FIT, cuda_graphs="on")])


def test_the_emulation_catches_python_state_that_a_replay_skips(monkeypatch, small_store):
    """The check can fail: a step that takes its lr from a host counter trains differently once replayed."""
    monkeypatch.setattr(graphs, "BACKEND", EmulatedBackend())
    cfg = make_config(**FIT)
    eager, _ = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="off")])
    host_scale = lambda self: torch.tensor(T._lr_scale(int(self.run.step), self.run.total, self.run.warmup),  # noqa: E731
                                           dtype=torch.float64)
    monkeypatch.setattr(graphs.GraphedSteps, "_scale", host_scale)
    graphed, _ = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="on")])
    assert not torch.equal(graphed[0].head.state_dict()["out.weight"], eager[0].head.state_dict()["out.weight"])


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_failed_capture_falls_back_to_eager_under_auto_and_is_an_error_under_on(monkeypatch, small_store, mode):
    from dfclip.errors import UserError

    monkeypatch.setattr(graphs, "BACKEND", EmulatedBackend(fail=RuntimeError("operation not permitted when stream "
                                                                            "is capturing\nmore detail")))
    cfg = make_config(**FIT, sam_rho=0.05)
    if mode == "on":
        with pytest.raises(UserError, match="--cuda-graphs on: capturing the training step failed"):
            _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="on")])
        return
    eager, _ = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="off")])
    fallback, lines = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="auto")])
    notes = [line for line in lines if "CUDA graphs off" in line]
    assert notes == ["note: CUDA graphs off, eager steps: capturing the training step failed (RuntimeError: "
                     "operation not permitted when stream is capturing)"]
    _assert_same(fallback, eager)


def test_on_a_cpu_every_mode_trains_eagerly(small_store):
    """auto and on have no effect on a CPU (no capture is tried), off is a no-op: three equal fits."""
    cfg = make_config(**FIT, sam_rho=0.05)
    fits = [_fit(small_store, [dataclasses.replace(cfg, cuda_graphs=m)]) for m in ("off", "auto", "on")]
    for results, lines in fits[1:]:
        _assert_same(results, fits[0][0])
        assert not [line for line in lines if "CUDA graphs" in line]


def test_device_cosine_scale_is_the_host_schedule():
    total, warmup = 50, 7
    steps = torch.arange(total, dtype=torch.float64)
    got = torch.stack([graphs.device_cosine_scale(s, total, warmup) for s in steps])
    want = torch.tensor([T._lr_scale(i, total, warmup) for i in range(total)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    no_warmup = torch.stack([graphs.device_cosine_scale(s, total, 0) for s in steps])
    torch.testing.assert_close(no_warmup, torch.tensor([T._lr_scale(i, total, 0) for i in range(total)],
                                                       dtype=torch.float64), rtol=1e-15, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cuda_graphed_fit_is_the_eager_fit_on_a_gpu(small_store, precision):
    """Real capture and replay: the graphed fit equals the eager one (fp32: to float round-off of the
    lr, which the graph reads as a float32 tensor; bf16: within bf16 tolerance)."""
    cfg = make_config(**FIT, sam_rho=0.05, feature_noise=True, cvar_alpha=0.3, auc_gamma=0.5, precision=precision)
    eager, _ = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="off")], device="cuda")
    graphed, lines = _fit(small_store, [dataclasses.replace(cfg, cuda_graphs="on")], device="cuda")
    assert not [line for line in lines if "CUDA graphs" in line]
    _assert_same(graphed, eager, exact=False)
    assert abs(graphed[0].reports["val"]["auc"] - eager[0].reports["val"]["auc"]) <= 2e-3


@pytest.mark.parametrize("per_model", [False, True])
def test_adamw_device_step_is_the_host_step(per_model):
    """BatchedAdamW.device_step (device step count, tensor lr) updates exactly as step() with host floats."""
    from dfclip.heads.optim import BatchedAdamW

    torch.manual_seed(0)
    init = [torch.randn(3, 4, 5), torch.randn(3, 5)]
    lr, wd = torch.tensor([1e-2, 3e-3, 1e-2]), torch.tensor([1e-4, 1e-4, 0.0])
    sides = []
    for device_side in (False, True):
        params = [p.clone().requires_grad_() for p in init]
        opt = BatchedAdamW(params, lr=lr, weight_decay=wd)
        if device_side:
            opt.begin_device_steps()
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            scale = [0.5 + 0.1 * step, 0.3, 0.5 + 0.1 * step] if per_model else 0.5 + 0.1 * step
            if device_side:
                opt.step(lr_scale=torch.tensor(scale, dtype=torch.float64), on_device=True)
                opt.advance_host_steps(1)
            else:
                opt.step(lr_scale=scale)
        sides.append((params, opt))
    (host, host_opt), (dev, dev_opt) = sides
    for a, b in zip(host, dev):
        assert torch.equal(a, b)
    assert [s["step"] for s in dev_opt.state.values()] == [s["step"] for s in host_opt.state.values()] == [4, 4]
    opt_dict = dev_opt.state_dict()  # host counts and moments survive a round trip after device steps
    assert all(s["step"] == 4 for s in opt_dict["state"].values())
