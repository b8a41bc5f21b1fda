"""Run configurations as data: one dataclass, JSON presets in heads/configs/, one resolver.

RunConfig is the single source of every training setting: each field carries its help text,
choices and sweep behaviour (see `setting`), and `dfhead fit` / `dfhead sweep` generate their
options from the fields (cli.py), so a setting is added or documented in one place.

A sweep is a list of RunConfigs. Fields in PER_MODEL may differ inside one batched group of
heads (they become tensors of shape [K]); every other field must be shared by the group
(it changes shapes, the data pipeline or the schedule), so configs are grouped by the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dfclip.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"

# How `dfhead sweep` takes a field: a comma list that becomes one grid axis; one value for the
# whole sweep (all heads share the data split); or the first of --seeds consecutive seeds.
GRID, ONE_VALUE, FIRST_SEED = "grid", "one value", "first seed"


def setting(default, help: str, *, choices: tuple[str, ...] = (), default_text: str | None = None,
            sweep: str = GRID, option: str | None = None, section: str | None = None):
    """A RunConfig field with its documentation, read by validate() and the CLI.

    help: the option's help text (without the default, which --help shows by itself).
    choices: the only valid values (validate() enforces them).
    default_text: what --help shows as the default instead of the value (e.g. "the embedding dim").
    sweep: GRID, ONE_VALUE or FIRST_SEED (how `dfhead sweep` takes it).
    option: the option's name when it is not the field's (holdout_sources -> holdout-source).
    section: starts a group of options (a --help panel); the fields after it belong to it too.
    """
    if sweep not in (GRID, ONE_VALUE, FIRST_SEED):
        raise ValueError(f"sweep must be {GRID!r}, {ONE_VALUE!r} or {FIRST_SEED!r}, got {sweep!r}")
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "default_text": default_text,
                                            "sweep": sweep, "option": option, "section": section})


@dataclass(frozen=True)
class RunConfig:
    head: str = setting("mlp", "mlp (paper: 3 x [Linear, BN, ReLU, Dropout]), linear (UniversalFakeDetect probe), or "
                               "layermix (learned softmax weights over the blocks of --feature, then the mlp; RINE).",
                        choices=("mlp", "linear", "layermix"), section="Head")
    depth: int = setting(3, "MLP hidden layers.")
    hidden: int | None = setting(None, "MLP width.", default_text="the embedding dim, as in the paper")
    dropout: float = setting(0.335, "MLP dropout (the default is the reference's).")
    l2_normalize: bool = setting(False, "Unit-normalise embeddings first.")
    feature: str = setting("proj", "Stored feature to train on: proj (the store's embeddings), blockN (a block stored "
                                   "with `dfembed extract --layers`), or a + list, concatenated: block8+block16. "
                                   "With --with (fused stores) it applies to each store, or each part names its "
                                   "store's folder: st_clip:proj+st_dino:block12.")
    # dfclip: L = CVaR_alpha(per-sample loss) + gamma * pairwise AUC loss (heads.losses.head_loss);
    # sp_cup:MODE: the reference's calculate_loss, literally (heads.losses.sp_cup_loss).
    objective: str = setting("dfclip", "dfclip: CVaR_alpha(--loss) + gamma * AUC(--auc-kind). sp_cup:MODE: the "
                                       "reference's objective MODE with --cvar-alpha, --auc-gamma and the --vs-* "
                                       "values (its VS constants by default); --loss and --auc-kind do not apply.",
                             choices=("dfclip", "sp_cup:erm", "sp_cup:dag", "sp_cup:auc", "sp_cup:vs",
                                      "sp_cup:vs_cvar_auc"), section="Loss")
    cvar_alpha: float = setting(1.0, "CVaR: train on the worst alpha-fraction of each batch, in (0, 1]; 1 = plain mean.")
    auc_gamma: float = setting(0.0, "Weight of the pairwise AUC loss (imbalance-insensitive); 0 = off.")
    auc_kind: str = setting("logistic", "Pairwise AUC loss: logistic, squared_hinge, or clamped_logistic (the "
                                        "reference's: pair loss capped at 13.8).",
                            choices=("logistic", "squared_hinge", "clamped_logistic"))
    auc_margin: float = setting(1.0, "Margin of the squared-hinge AUC loss.")
    loss: str = setting("bce", "Per-sample loss: bce, or vs (vector-scaling, as the reference).", choices=("bce", "vs"))
    vs_delta_fake: float = setting(0.9, "VS multiplicative adjustment for fakes.")
    vs_delta_real: float = setting(1.1, "VS multiplicative adjustment for reals.")
    vs_iota_fake: float = setting(-0.05, "VS additive adjustment for fakes.")
    vs_iota_real: float = setting(0.05, "VS additive adjustment for reals.")
    vs_scale: float = setting(10.0, "VS logit scale (the reference multiplies VS logits by 10 before BCE).")
    sam_rho: float = setting(0.0, "SAM radius (sharpness-aware minimisation over AdamW); 0 = plain AdamW.",
                             section="Optimisation")
    sam_adaptive: bool = setting(False, "ASAM (scale-invariant SAM).")
    # 3e-3 converges in ~10 epochs on synthetic and demo stores
    lr: float = setting(3e-3, "AdamW peak learning rate (see --schedule); --preset sp_cup uses 1e-5.")
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay.")
    batch_size: int = setting(256, "Batch size.")
    epochs: int = setting(20, "Epochs.")
    schedule: str = setting("cosine", "cosine: linear warmup, then one cosine decay to 0, per step. sp_cup: the "
                                      "reference's CosineAnnealingLR(T_max=epochs/4, eta_min=--min-lr) stepped per "
                                      "epoch, a cosine wave between lr and --min-lr; no warmup.",
                            choices=("cosine", "sp_cup"))
    min_lr: float = setting(1e-6, "Floor of the sp_cup schedule (the reference's eta_min).")
    warmup_epochs: float = setting(1.0, "Linear warmup length in epochs (cosine schedule only).")
    seed: int = setting(0, "Seed of init, batch order, dropout and noise.", sweep=FIRST_SEED)
    feature_noise: bool = setting(False, "Reference augmentation: add x + lam*sigma*eps copies.", section="Data")
    balanced: bool = setting(False, "Batches with a fixed fake rate (--fake-rate), so the AUC term always sees both "
                                    "classes.")
    fake_rate: float = setting(0.5, "Fake fraction of each batch with --balanced.")
    drop_last: bool = setting(True, "Drop each epoch's last, short batch (the reference keeps it). Kept, a last batch "
                                    "of one row is still dropped for the mlp head without feature noise: BatchNorm "
                                    "needs two rows.")
    val_frac: float = setting(0.2, "Validation fraction when the store has no split column and no --val-store "
                                   "(grouped by video).", sweep=ONE_VALUE)
    split_seed: int = setting(0, "Seed of that validation split.", sweep=ONE_VALUE)  # unlike seed, one per sweep
    holdout_sources: tuple[str, ...] = setting(
        (), "Hold a source out of train and val and report it as an unseen generator (repeatable).",
        default_text="none", sweep=ONE_VALUE, option="holdout_source")
    select: str = setting("auc", "Keep the epoch with the best val auc, the best val video_auc (the AUC over "
                                 "videos, each scored by --video-pool over its frames; needs validation rows with a "
                                 "group, e.g. a video), the lowest val loss, or the last.",
                          choices=("auc", "video_auc", "loss", "last"), section="Selection and threshold")
    patience: int = setting(0, "Stop after this many epochs without improvement; 0 = never stop early.")
    threshold: str = setting("eer", "Decision threshold saved with the run: eer, a probability like 0.5, or "
                                    "fpr@RATE like fpr@0.01.")
    calibration: str = setting("temperature", "After training, fit P(fake) on the validation logits by NLL "
                                              "(heads.calibration): temperature (sigmoid(z / T)), platt "
                                              "(sigmoid(a z + b)), or none. Predicted labels do not change.",
                               choices=("temperature", "platt", "none"), sweep=ONE_VALUE)
    # Frame probabilities, not logits, are pooled: heads.metrics explains why (the note above VIDEO_POOLS).
    video_pool: str = setting("mean", "How a video's frame scores (probabilities) become its score, for video-level "
                                      "metrics, --select video_auc and predict's per-video rows: mean, max, or lse "
                                      "(T * log(mean(exp(p / T))), between the mean and the max).",
                              choices=("mean", "max", "lse"), sweep=ONE_VALUE)
    pool_temperature: float = setting(0.1, "Temperature T of --video-pool lse, in probability units: T -> 0 gives "
                                           "the max, a large T the mean.", sweep=ONE_VALUE)
    precision: str = setting("auto", "Precision of the head's hidden matmuls: bf16 (float32 weights, optimizer, "
                                     "BatchNorm, logits, losses and metrics), fp32, or auto = bf16 on CUDA and on "
                                     "CPUs with native bf16 (AVX512-BF16 / AMX), else fp32. config.json records "
                                     "the resolved value.", choices=("auto", "fp32", "bf16"), section="Compute")
    cuda_graphs: str = setting("auto", "CUDA graphs on a GPU: on = each training step (forward, losses, backward, "
                                       "SAM, AdamW) is captured once and replayed, one launch per step instead of "
                                       "hundreds; off = eager steps; auto = on where the capture works, else eager "
                                       "with one line saying why. No effect on a CPU.",
                               choices=("auto", "on", "off"), sweep=ONE_VALUE)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["holdout_sources"] = list(self.holdout_sources)
        return d


PER_MODEL = ("cvar_alpha", "auc_gamma", "auc_margin", "sam_rho", "lr", "weight_decay", "seed",
             "vs_delta_fake", "vs_delta_real", "vs_iota_fake", "vs_iota_real", "vs_scale")
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
CHOICES = {name: f.metadata["choices"] for name, f in FIELDS.items() if f.metadata["choices"]}
# Names settings had before a rename: old run directories' config.json and user presets still load.
LEGACY_NAMES = {"per_sample": "loss"}
_TYPES = typing.get_type_hints(RunConfig)


def _sections() -> dict[str, str]:
    out, current = {}, ""
    for name, f in FIELDS.items():
        current = f.metadata["section"] or current
        out[name] = current
    return out


SECTION = _sections()  # field -> the --help panel it is shown in


def option_name(name: str) -> str:
    """The CLI option of a RunConfig field: --cvar-alpha, --holdout-source."""
    return "--" + (FIELDS[name].metadata["option"] or name).replace("_", "-")


def value_type(name: str) -> type:
    """The type of one value of a field: int for `int | None`, str for `tuple[str, ...]`."""
    args = [a for a in typing.get_args(_TYPES[name]) if a not in (type(None), Ellipsis)]
    return args[0] if args else _TYPES[name]


def is_list(name: str) -> bool:
    """Whether a field holds several values (holdout_sources: a repeatable option)."""
    return typing.get_origin(_TYPES[name]) is tuple


def shown_default(name: str) -> str:
    """The default as --help shows it: the field's default_text, else its value (1e-4 -> 0.0001)."""
    f = FIELDS[name]
    if f.metadata["default_text"] is not None:
        return f.metadata["default_text"]
    v = f.default
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def group_key(cfg: RunConfig) -> tuple:
    """Configs with equal keys train together as one batched model.

    SAM on (rho > 0) or off splits groups too: a SAM step runs a second forward with fresh dropout
    masks, which a rho = 0 model alone would not draw (nor pay for).
    """
    return tuple((k, v) for k, v in sorted(cfg.to_dict().items()) if k not in PER_MODEL and not isinstance(v, list)) + (
        ("holdout_sources", tuple(cfg.holdout_sources)), ("sam", cfg.sam_rho > 0))


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
    return _known_fields(data, f"preset {p}")


def _known_fields(values: dict, source: str) -> dict:
    """values with legacy names mapped to today's (per_sample -> loss); UserError on unknown names."""
    values = dict(values)
    for old, new in LEGACY_NAMES.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise UserError(f"{source} has unknown fields {sorted(unknown)}; valid fields: {', '.join(FIELDS)}")
    return values


def config_from_dict(values: dict, *, source: str = "settings") -> RunConfig:
    """The RunConfig of saved settings (a run's config.json "run", a preset's fields), not validated.

    The one place where saved settings become a RunConfig: legacy names are mapped (runs written
    before `per_sample` became `loss` still load) and fields missing from old files take their defaults.
    """
    values = _known_fields(values, source)
    t = values.get("threshold")
    if isinstance(t, (int, float)) and not isinstance(t, bool):  # "threshold": 0.5 in a preset means "0.5"
        values["threshold"] = str(t)
    if isinstance(values.get("holdout_sources"), list):  # anything else is left for validate() to name
        values["holdout_sources"] = tuple(values["holdout_sources"])
    return RunConfig(**values)


def make_config(preset: str | None = None, **overrides) -> RunConfig:
    """Preset values, then explicit overrides (None means 'not given'), validated."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(config_from_dict(values))


def validate(cfg: RunConfig) -> RunConfig:
    """Raise UserError naming every bad setting and its valid range, one line per problem.

    Types and finiteness come first, for every field at once (a preset or a hand-edited
    config.json can hold "abc", null or NaN, and `nan < 0` is False, so a range check alone
    would let NaN through); the range checks then only see real, finite numbers.
    """
    problems = _type_problems(cfg)
    if not problems:
        problems = _range_problems(cfg)
    if problems:
        raise UserError("\n".join(problems))
    return cfg


def _type_problems(cfg: RunConfig) -> list[str]:
    """One line per field whose value is not of its type (or not finite, for numbers)."""
    problems = []
    for name in FIELDS:
        v, kind = getattr(cfg, name), value_type(name)
        if v is None and name == "hidden":
            continue
        values = v if is_list(name) else (v,)
        if is_list(name) and not isinstance(v, (list, tuple)):
            ok = False
        elif kind is bool:
            ok = all(isinstance(x, bool) for x in values)
        elif kind is int:
            ok = all(isinstance(x, int) and not isinstance(x, bool) for x in values)
        elif kind is float:
            ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values)
        else:
            ok = all(isinstance(x, str) for x in values)
        if not ok:
            what = {float: "a finite number", int: "a whole number", bool: "true or false"}.get(kind, "text")
            problems.append(f"{option_name(name)} must be {what}, got {v!r}")
    return problems


def _range_problems(cfg: RunConfig) -> list[str]:
    problems = []

    def bad(opt: str, why: str) -> None:
        problems.append(f"{option_name(opt)} {why}")

    if not 0 < cfg.cvar_alpha <= 1:
        bad("cvar_alpha", f"must be in (0, 1] (1 = plain mean), got {cfg.cvar_alpha}")
    for name in ("auc_gamma", "sam_rho", "weight_decay", "auc_margin", "min_lr"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        bad("lr", f"must be > 0, got {cfg.lr}")
    for name in ("batch_size", "epochs", "depth"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.hidden is not None and cfg.hidden < 1:
        bad("hidden", f"must be >= 1, got {cfg.hidden}")
    if cfg.head == "mlp" and cfg.batch_size < 2:  # BatchNorm needs two rows per batch to normalise
        bad("batch_size", f"must be >= 2 for the mlp head (BatchNorm), got {cfg.batch_size}; or use --head linear")
    for name in ("warmup_epochs", "patience"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        bad("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.val_frac < 1:
        bad("val_frac", f"must be in (0, 1), got {cfg.val_frac}")
    if cfg.pool_temperature <= 0:
        bad("pool_temperature", f"must be > 0, got {cfg.pool_temperature}")
    if not 0 < cfg.fake_rate < 1:
        bad("fake_rate", f"must be in (0, 1), got {cfg.fake_rate}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.objective != "dfclip":
        for name in ("loss", "auc_kind"):
            if getattr(cfg, name) != FIELDS[name].default:
                bad(name, f"applies to --objective dfclip only: {cfg.objective} fixes its own losses; "
                          f"drop {option_name(name)} or use --objective dfclip")
    try:
        parse_threshold(cfg.threshold)
    except UserError as e:
        problems.append(str(e))
    from dfclip.store.format import feature_parts

    try:  # the spelling; whether the store holds the feature is checked when it is loaded
        parts = feature_parts(cfg.feature)
        if cfg.head == "layermix" and len(parts) < 2:
            bad("feature", f"must name two or more blocks for --head layermix, got {cfg.feature!r}; "
                           "e.g. --feature block4+block8+block12")
    except UserError as e:
        problems.append(str(e))
    return problems


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
        kind = value_type(name)
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
