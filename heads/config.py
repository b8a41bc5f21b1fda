"""Run configurations as data: one dataclass, JSON presets in heads/configs/, one resolver.

A sweep is a list of RunConfigs. Fields in PER_MODEL may differ inside one batched group of
heads (they become tensors of shape [K]); every other field must be shared by the group
(it changes shapes, the data pipeline or the schedule), so configs are grouped by the rest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from dfclip.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class RunConfig:
    # head architecture
    head: str = "mlp"  # mlp (paper: 3 x [Linear, BN, ReLU, Dropout]) | linear (UniversalFakeDetect probe)
    depth: int = 3
    hidden: int | None = None  # None = the embedding dim, as in the paper
    dropout: float = 0.335
    l2_normalize: bool = False
    # loss: L = CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss
    cvar_alpha: float = 1.0  # 1 = plain mean (ERM)
    auc_gamma: float = 0.0
    auc_kind: str = "logistic"  # logistic | squared_hinge
    auc_margin: float = 1.0
    loss: str = "bce"  # per-sample loss: bce | vs
    vs_delta_fake: float = 0.9
    vs_delta_real: float = 1.1
    vs_iota_fake: float = -0.05
    vs_iota_real: float = 0.05
    vs_scale: float = 10.0  # the reference multiplies VS logits by 10 before BCE
    # optimisation
    sam_rho: float = 0.0  # 0 = plain AdamW
    sam_adaptive: bool = False
    lr: float = 3e-3  # converges in ~10 epochs on synthetic and demo stores; --preset sp_cup uses 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 20
    warmup_epochs: float = 1.0
    seed: int = 0
    # data
    feature_noise: bool = False
    balanced: bool = False
    fake_rate: float = 0.5
    val_frac: float = 0.2
    split_seed: int = 0  # the validation split's seed: shared by a whole sweep, unlike --seed
    holdout_sources: tuple[str, ...] = ()
    # model selection and decision threshold
    select: str = "auc"  # auc | loss | last
    patience: int = 0  # epochs without improvement before stopping; 0 = never stop early
    threshold: str = "eer"  # eer | 0.5 | fpr@0.01 (any fpr@X)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["holdout_sources"] = list(self.holdout_sources)
        return d


PER_MODEL = ("cvar_alpha", "auc_gamma", "auc_margin", "sam_rho", "lr", "weight_decay", "seed",
             "vs_delta_fake", "vs_delta_real", "vs_iota_fake", "vs_iota_real", "vs_scale")
CHOICES = {"head": ("mlp", "linear"), "auc_kind": ("logistic", "squared_hinge"), "loss": ("bce", "vs"),
           "select": ("auc", "loss", "last")}
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def group_key(cfg: RunConfig) -> tuple:
    """Configs with equal keys train together as one batched model."""
    return tuple((k, v) for k, v in sorted(cfg.to_dict().items()) if k not in PER_MODEL and not isinstance(v, list)) + (
        ("holdout_sources", tuple(cfg.holdout_sources)),)


def load_preset(name_or_path: str) -> dict:
    """A preset by name (heads/configs/NAME.json) or a path to a JSON file of RunConfig fields."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PRESET_DIR / f"{name_or_path}.json"
    if not p.is_file():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.json"))
        raise UserError(f"unknown preset {name_or_path!r}; use one of {', '.join(names)} or a path to a JSON file")
    data = json.loads(p.read_text())
    data.pop("_doc", None)
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise UserError(f"preset {p} has unknown fields {sorted(unknown)}; valid fields: {', '.join(FIELDS)}")
    return data


def make_config(preset: str | None = None, **overrides) -> RunConfig:
    """Preset values, then explicit overrides (None means 'not given'), validated."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "holdout_sources" in values:
        values["holdout_sources"] = tuple(values["holdout_sources"])
    return validate(RunConfig(**values))


def validate(cfg: RunConfig) -> RunConfig:
    """Raise UserError naming the bad option and its valid range."""
    def bad(opt: str, why: str) -> UserError:
        return UserError(f"--{opt.replace('_', '-')} {why}")

    if not 0 < cfg.cvar_alpha <= 1:
        raise bad("cvar_alpha", f"must be in (0, 1] (1 = plain mean), got {cfg.cvar_alpha}")
    for name in ("auc_gamma", "sam_rho", "weight_decay", "auc_margin"):
        if getattr(cfg, name) < 0:
            raise bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise bad("lr", f"must be > 0, got {cfg.lr}")
    for name in ("batch_size", "epochs", "depth"):
        if getattr(cfg, name) < 1:
            raise bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.head == "mlp" and cfg.batch_size < 2:  # BatchNorm needs two rows per batch to normalise
        raise bad("batch_size", f"must be >= 2 for the mlp head (BatchNorm), got {cfg.batch_size}; or use --head linear")
    for name in ("warmup_epochs", "patience"):
        if getattr(cfg, name) < 0:
            raise bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise bad("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.val_frac < 1:
        raise bad("val_frac", f"must be in (0, 1), got {cfg.val_frac}")
    if not 0 < cfg.fake_rate < 1:
        raise bad("fake_rate", f"must be in (0, 1), got {cfg.fake_rate}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise bad(name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    parse_threshold(cfg.threshold)
    return cfg


def parse_threshold(spec: str) -> tuple[str, float]:
    """'eer' -> ('eer', 0); '0.5' -> ('fixed', 0.5); 'fpr@0.01' -> ('fpr', 0.01)."""
    s = str(spec).strip().lower()
    if s == "eer":
        return "eer", 0.0
    try:
        if s.startswith("fpr@"):
            v = float(s[4:])
            if 0 < v < 1:
                return "fpr", v
        else:
            v = float(s)
            if 0 <= v <= 1:
                return "fixed", v
    except ValueError:
        pass
    raise UserError(f"--threshold must be eer, a probability like 0.5, or fpr@RATE like fpr@0.01; got {spec!r}")


def parse_grid_values(options: dict[str, str]) -> dict[str, list]:
    """CLI comma lists -> typed lists per RunConfig field: {"cvar_alpha": "0.1,0.3"} -> {"cvar_alpha": [0.1, 0.3]}."""
    out = {}
    for name, text in options.items():
        if name not in FIELDS:
            raise UserError(f"unknown option --{name.replace('_', '-')}")
        default = FIELDS[name].default
        kind = bool if isinstance(default, bool) else int if isinstance(default, int) else float if isinstance(
            default, float) else str
        if name == "hidden":
            kind = int
        values = []
        for item in str(text).split(","):
            item = item.strip()
            try:
                if kind is bool:
                    if item.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    values.append(item.lower() in ("true", "1", "yes"))
                else:
                    values.append(kind(item))
            except ValueError:
                raise UserError(f"--{name.replace('_', '-')} got {item!r}; expected a comma list of "
                                f"{kind.__name__} values, e.g. --{name.replace('_', '-')} {default},{default}") from None
        out[name] = values
    return out
