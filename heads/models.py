"""Classifier heads on cached CLIP embeddings, batched over K independent models.

A sweep trains K configurations that share one architecture as ONE module: every
parameter and buffer has a leading dim K, the forward takes x [K, B, D] (each model its
own batch) and returns logits [K, B]. A plain fit is the K = 1 case.

Initialisation follows the reference (SP_CUP): nn.init.kaiming_uniform_ (fan_in, relu) on
every Linear weight, biases as nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Model k draws its init from its own seed,
so its starting weights are those of a K = 1 model with that seed, whatever else is in
the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfclip.errors import UserError
from dfclip.heads.mlp_layer import HiddenLayer, eval_hidden_layer, keep_mask

# One generator for the whole [K, ...] draw, or one per model (model k's randomness then
# does not depend on K or on the other models; models given the same object share its draws).
Generators = torch.Generator | Sequence[torch.Generator] | None


class BatchedLinearLayer(nn.Module):
    """K independent nn.Linear(fan_in, fan_out): weight [K, out, in] (nn.Linear's layout), bias [K, out]."""

    def __init__(self, k: int, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(k, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, B, in] -> [K, B, out]; x [B, in] (one batch shared by all models) -> [K, B, out]."""
        k, fan_out, fan_in = self.weight.shape
        if x.dim() == 2:
            # Shared input: one [B, in] x [in, K*out] matmul instead of K copies of x.
            y = x @ self.weight.reshape(k * fan_out, fan_in).T
            return y.view(x.shape[0], k, fan_out).transpose(0, 1) + self.bias[:, None, :]
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


def _init_linears(layers: Sequence[BatchedLinearLayer], seeds: Sequence[int]) -> None:
    """Kaiming-uniform weights (fan_in, relu) and nn.Linear's default bias init, as the reference;
    model k's draws come from torch.Generator(seeds[k]), layer by layer in forward order (weight,
    then bias), exactly as a K = 1 model with that seed would draw them."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        for layer in layers:
            fan_in = layer.weight.shape[2]
            for i, g in enumerate(gens):
                w = torch.empty(layer.weight.shape[1:])
                nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu", generator=g)
                layer.weight[i].copy_(w)
                bound = 1.0 / fan_in**0.5
                layer.bias[i].copy_(torch.empty(layer.bias.shape[1:]).uniform_(-bound, bound, generator=g))


class BatchedBatchNorm(nn.Module):
    """K independent nn.BatchNorm1d(H): parameters [K, H] and running statistics [K, H].

    Same maths as nn.BatchNorm1d (eps 1e-5, momentum 0.1, biased variance to normalise,
    unbiased variance in running_var). It holds the state only: BatchedMLP normalises with
    torch's batch-norm kernels in heads.mlp_layer (HiddenLayer in training, eval_hidden_layer in eval).
    """

    def __init__(self, k: int, features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(k, features))
        self.bias = nn.Parameter(torch.zeros(k, features))
        self.register_buffer("running_mean", torch.zeros(k, features))
        self.register_buffer("running_var", torch.ones(k, features))


def distinct_generators(generators: Sequence[torch.Generator]) -> tuple[list[torch.Generator], list[int]]:
    """(the distinct generator objects in first-seen order, for each model the index of its own).

    Models handed the SAME generator object share one draw per call: the trainer gives configs with
    equal seeds one generator, so a model's masks and noise are those of its own fit whatever else
    shares its group, and a grid of one seed pays for one draw instead of K.
    """
    unique: dict[int, int] = {}
    which = [unique.setdefault(id(g), len(unique)) for g in generators]
    objects = {id(g): g for g in generators}
    return [objects[i] for i in unique], which


def _float32_logits(out: BatchedLinearLayer, h: torch.Tensor) -> torch.Tensor:
    """Logits [K, B] of the output layer, always in the weights' precision (float32), even under autocast.

    The layer maps each row to ONE number, so bf16 would save no time here; and logits rounded to
    bf16's 8 significant bits would tie many scores (AUC, thresholds) and coarsen the losses.
    """
    with torch.autocast(h.device.type, enabled=False):
        return out(h.to(out.weight.dtype)).squeeze(-1)


def _check_seeds(k: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        # Only for models whose weights are loaded right after (head_from_config, select).
        return list(range(k))
    seeds = [int(s) for s in seeds]
    if len(seeds) != k:
        raise ValueError(f"need one seed per model: k={k} but {len(seeds)} seeds")
    return seeds


class BatchedMLP(nn.Module):
    """K copies of the paper's head: depth x [Linear -> BatchNorm1d -> ReLU -> Dropout] -> Linear(H, 1).

    Parameters are [K, ...]; forward(x [K, B, D]) -> logits [K, B].
    """

    def __init__(
        self,
        k: int,
        dim: int,
        *,
        hidden: int | None = None,
        depth: int = 3,
        dropout: float = 0.335,
        seeds: Sequence[int] | None = None,
    ):
        super().__init__()
        hidden = dim if hidden is None else int(hidden)
        if depth < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise UserError(
                f"invalid MLP head (depth={depth}, hidden={hidden}, dropout={dropout}); "
                "use depth >= 1, hidden >= 1 and 0 <= dropout < 1"
            )
        self.k, self.dim, self.hidden, self.depth, self.dropout = k, dim, hidden, depth, float(dropout)
        self.seeds = _check_seeds(k, seeds)
        widths = [dim] + [hidden] * depth
        self.linears = nn.ModuleList(BatchedLinearLayer(k, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(BatchedBatchNorm(k, hidden) for _ in range(depth))
        self.out = BatchedLinearLayer(k, hidden, 1)
        _init_linears([*self.linears, self.out], self.seeds)

    @property
    def config(self) -> dict:
        """JSON-serialisable description that rebuilds this head (see head_from_config)."""
        return {"kind": "mlp", "dim": self.dim, "hidden": self.hidden, "depth": self.depth, "dropout": self.dropout}

    def forward(
        self, x: torch.Tensor, *, update_stats: bool = True, generator: Generators = None
    ) -> torch.Tensor:
        """Logits [K, B] for x [K, B, D] (x [B, D]: the same batch for every model).

        update_stats=False (train mode): normalise with batch statistics but leave BN running
        buffers untouched, e.g. for SAM's second forward of the same step.
        generator: dropout masks from one generator, or one per model (list of K); generators
        must live on x's device. None uses torch's global RNG.
        """
        # The hidden layers run in the autocast dtype if a bf16 autocast is on (heads.precision.matmuls_in),
        # else in the weights' dtype; statistics, parameters and the logits stay float32.
        device = x.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.out.weight.dtype
        if self.training:
            return self._train_forward(x, dtype, update_stats, generator)
        with torch.autocast(device.type, enabled=False):
            h = x.to(dtype)
            for linear, norm in zip(self.linears, self.norms):
                h = eval_hidden_layer(h, linear.weight, linear.bias, norm.weight, norm.bias, norm.running_mean,
                                      norm.running_var, norm.eps)
            return _float32_logits(self.out, h)

    def _train_forward(self, x: torch.Tensor, dtype: torch.dtype, update_stats: bool,
                       generator: Generators) -> torch.Tensor:
        """Train mode: each hidden layer is one mlp_layer.HiddenLayer in `dtype`."""
        device = x.device
        rows = x.shape[-2]
        if rows < 2:
            raise ValueError(f"BatchNorm in train mode needs at least 2 rows per model, got {rows}")
        if generator is None or isinstance(generator, torch.Generator):  # one stream: K draws in turn
            draws, which = [generator] * self.k, list(range(self.k))
        else:
            draws, which = distinct_generators(generator)
        with torch.autocast(device.type, enabled=False):
            h = x.to(dtype)
            for linear, norm in zip(self.linears, self.norms):
                keep = None if self.dropout == 0 else keep_mask(rows, norm.weight.shape[1], self.dropout, draws,
                                                                which, dtype, device)
                h = HiddenLayer.apply(h, linear.weight, linear.bias, norm.weight, norm.bias, keep,
                                      1.0 / (1.0 - self.dropout), norm.eps,
                                      norm.running_mean if update_stats else None,
                                      norm.running_var if update_stats else None, norm.momentum)
            return _float32_logits(self.out, h)

    def select(self, indices: Sequence[int]) -> BatchedMLP:
        """A new BatchedMLP holding copies of models `indices` (weights, BN buffers, seeds, mode)."""
        return _select(self, indices)


class BatchedLinear(nn.Module):
    """K linear probes Linear(D, 1) (UniversalFakeDetect style); forward(x [K, B, D]) -> logits [K, B]."""

    def __init__(self, k: int, dim: int, *, seeds: Sequence[int] | None = None):
        super().__init__()
        self.k, self.dim = k, dim
        self.seeds = _check_seeds(k, seeds)
        self.linear = BatchedLinearLayer(k, dim, 1)
        _init_linears([self.linear], self.seeds)

    @property
    def config(self) -> dict:
        """JSON-serialisable description that rebuilds this head (see head_from_config)."""
        return {"kind": "linear", "dim": self.dim}

    def forward(
        self, x: torch.Tensor, *, update_stats: bool = True, generator: Generators = None
    ) -> torch.Tensor:
        """Logits [K, B] for x [K, B, D] or [B, D]; update_stats and generator are accepted and unused."""
        return _float32_logits(self.linear, x.to(self.linear.weight.dtype))

    def select(self, indices: Sequence[int]) -> BatchedLinear:
        """A new BatchedLinear holding copies of models `indices`."""
        return _select(self, indices)


class BatchedLayerMix(nn.Module):
    """K RINE-style heads on several stored blocks: softmax-weighted sum of the blocks, then the paper's MLP.

    x [K, B, L*W] is the concatenation of L features of equal width W (`--feature block4+block8+...`,
    as Store.load concatenates them); each model learns its own weights over the L blocks
    (softmax of `mix` [K, L], initialised equal) and feeds the mixed [K, B, W] to a BatchedMLP.
    The simplest form of Koutlis & Papadopoulos' RINE (ECCV 2024), without its per-block projections.
    """

    def __init__(self, k: int, dim: int, *, feature: str, hidden: int | None = None, depth: int = 3,
                 dropout: float = 0.335, seeds: Sequence[int] | None = None):
        super().__init__()
        from dfclip.store.format import feature_parts

        n_blocks = len(feature_parts(feature))
        if n_blocks < 2 or dim % n_blocks:
            raise UserError(f"the layermix head mixes two or more features of one width, got --feature {feature} "
                            f"({dim} columns); use e.g. --feature block4+block8+block12")
        self.k, self.dim, self.feature, self.n_blocks = k, dim, feature, n_blocks
        self.mix = nn.Parameter(torch.zeros(k, n_blocks))
        self.mlp = BatchedMLP(k, dim // n_blocks, hidden=hidden, depth=depth, dropout=dropout, seeds=seeds)
        self.seeds = self.mlp.seeds

    @property
    def config(self) -> dict:
        """JSON-serialisable description that rebuilds this head (see head_from_config)."""
        mlp = self.mlp.config
        return {"kind": "layermix", "dim": self.dim, "feature": self.feature, "hidden": mlp["hidden"],
                "depth": mlp["depth"], "dropout": mlp["dropout"]}

    def block_weights(self) -> torch.Tensor:
        """[K, L] softmax weights over the blocks, in --feature order."""
        return torch.softmax(self.mix, dim=-1)

    def forward(self, x: torch.Tensor, *, update_stats: bool = True, generator: Generators = None) -> torch.Tensor:
        """Logits [K, B] for x [K, B, L*W] or [B, L*W]."""
        x = x.to(self.mix.dtype)
        blocks = x.unflatten(-1, (self.n_blocks, -1))  # [K, B, L, W] or [B, L, W]
        weights = self.block_weights()  # [K, L]
        if blocks.dim() == 3:  # one batch shared by all models
            mixed = torch.einsum("blw,kl->kbw", blocks, weights)
        else:
            mixed = torch.einsum("kblw,kl->kbw", blocks, weights)
        return self.mlp(mixed, update_stats=update_stats, generator=generator)

    def select(self, indices: Sequence[int]) -> "BatchedLayerMix":
        """A new BatchedLayerMix holding copies of models `indices`."""
        return _select(self, indices)


Head = BatchedMLP | BatchedLinear | BatchedLayerMix


# --- the registry of head kinds --------------------------------------------------------------


@dataclass(frozen=True)
class HeadKind:
    """One registered head architecture (RunConfig.head names it).

    module: the batched nn.Module, built as module(k, dim, seeds=seeds, **options); its
        `.config` holds "kind", "dim" and those options, which head_from_config rebuilds from.
    options: the RunConfig fields it reads, passed to module under the same names.
    The sizes, for memory estimates (heads.run.sweep_memory_bytes) and CPU chunking, are
    functions of (dim, **options) for ONE model:
    params: its parameters and buffers (floats).
    activations: floats per batch row of one forward, summed over its layers' outputs.
    width: floats per batch row of its widest layer output (what one eval step holds a few of).
    """

    module: type[nn.Module]
    options: tuple[str, ...]
    params: Callable[..., int]
    activations: Callable[..., int]
    width: Callable[..., int]


def _mlp_params(dim: int, hidden: int | None = None, depth: int = 3, **_) -> int:
    h = hidden or dim
    # depth Linear layers, a BatchNorm per layer (weight, bias, running mean and var), the output Linear
    return dim * h + h * h * (depth - 1) + 5 * h * depth + h + 1


HEAD_KINDS: dict[str, HeadKind] = {
    "mlp": HeadKind(BatchedMLP, ("hidden", "depth", "dropout"), _mlp_params,
                    activations=lambda dim, hidden=None, depth=3, **_: (hidden or dim) * depth + 1,
                    width=lambda dim, hidden=None, **_: hidden or dim),
    "linear": HeadKind(BatchedLinear, (), lambda dim, **_: dim + 1, activations=lambda dim, **_: 1,
                       width=lambda dim, **_: 1),
}


def _layermix_width(dim: int, feature: str = "proj") -> int:
    from dfclip.store.format import feature_parts

    return dim // max(1, len(feature_parts(feature)))


HEAD_KINDS["layermix"] = HeadKind(
    BatchedLayerMix, ("feature", "hidden", "depth", "dropout"),
    # the inner MLP on width W = dim / blocks, plus one mixing weight per block
    params=lambda dim, feature="proj", hidden=None, depth=3, **_: (
        _mlp_params(_layermix_width(dim, feature), hidden, depth) + dim // _layermix_width(dim, feature)),
    activations=lambda dim, feature="proj", hidden=None, depth=3, **_: (
        (hidden or _layermix_width(dim, feature)) * depth + 1),
    width=lambda dim, feature="proj", hidden=None, **_: hidden or _layermix_width(dim, feature),
)


def head_options(cfg) -> dict:
    """The options of cfg.head's kind, read from a RunConfig (what build_head takes as **options)."""
    return {name: getattr(cfg, name) for name in _kind(cfg.head).options}


def _kind(kind: str) -> HeadKind:
    if kind not in HEAD_KINDS:
        raise UserError(f"unknown head kind {kind!r}; choose one of: {', '.join(HEAD_KINDS)}")
    return HEAD_KINDS[kind]


def _select(head: Head, indices: Sequence[int]) -> Head:
    indices = [int(i) for i in indices]
    if not indices or not all(0 <= i < head.k for i in indices):
        raise ValueError(f"select needs indices in [0, {head.k}), got {indices}")
    ref = next(head.parameters())
    new = head_from_config(head.config, len(indices)).to(device=ref.device, dtype=ref.dtype)
    rows = torch.tensor(indices, device=ref.device)
    new.load_state_dict({name: t.index_select(0, rows) for name, t in head.state_dict().items()})
    new.seeds = [head.seeds[i] for i in indices]
    return new.train(head.training)


def build_head(kind: str, k: int, dim: int, seeds: Sequence[int] | None = None, **options) -> Head:
    """K heads of `kind` (a HEAD_KINDS key) on D=dim embeddings; options: the kind's (mlp: hidden, depth, dropout)."""
    entry = _kind(kind)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise UserError(
            f"the {kind} head has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(entry.options)) or 'none'}"
        )
    return entry.module(k, dim, seeds=seeds, **options)


def head_from_config(config: dict, k: int, seeds: Sequence[int] | None = None) -> Head:
    """Rebuild K heads from `.config` (weights freshly initialised; load a state_dict after)."""
    cfg = dict(config)
    return build_head(cfg.pop("kind"), k, cfg.pop("dim"), seeds, **cfg)
