"""`dfhead fit` and `dfhead sweep` options are generated from RunConfig's fields: one option per
field with the field's help and default, the fields' own option names in errors, and values that
reach RunConfig unchanged. Saved settings with the old name `per_sample` still load."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import typer

from dfclip import cli
from dfclip.errors import UserError
from dfclip.heads import config as C
from dfclip.heads.report import load_run_config

WIDE = "400"  # no wrapping in --help, so each option is one table row


def help_rows(dfhead, monkeypatch, command: str) -> list[str]:
    """The option rows of `dfhead COMMAND --help`, as shown to a user."""
    monkeypatch.setenv("COLUMNS", WIDE)
    code, out, err = dfhead(command, "--help")
    assert code == 0, err
    return [line for line in out.splitlines() if re.match(r"│ +--", line)]


def expected_help(name: str, command: str) -> str:
    meta = C.FIELDS[name].metadata
    if command == "fit":
        return meta["help"]
    if C.is_list(name):
        return meta["help"] + " One set for the whole sweep."
    return meta["help"] + {C.GRID: " Comma list.", C.ONE_VALUE: " One value for the whole sweep.",
                           C.FIRST_SEED: " The first seed: --seeds N trains seed, seed+1, ..."}[meta["sweep"]]


def expected_default(name: str, command: str) -> str:
    flag = C.option_name(name)[2:]
    if command == "fit" and C.value_type(name) is bool and not C.is_list(name):
        return flag if C.FIELDS[name].default else f"no-{flag}"
    return C.shown_default(name)


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_every_field_has_exactly_one_option_with_its_help_and_default(dfhead, monkeypatch, command):
    rows = help_rows(dfhead, monkeypatch, command)
    first_option = [re.match(r"│ +(--[\w-]+)", row).group(1) for row in rows]
    assert len(first_option) == len(set(first_option)), "an option is listed twice"
    for name in C.FIELDS:
        option = C.option_name(name)
        (row,) = [r for r, o in zip(rows, first_option) if o == option]
        assert expected_help(name, command) in row, (name, row)
        assert f"[default: ({expected_default(name, command)})]" in row, (name, row)
        if command == "fit" and C.value_type(name) is bool:
            assert f"--no-{option[2:]}" in row


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_generated_signature_is_what_typer_reads(command):
    """One keyword-only parameter per field, default None ("not given": the preset or RunConfig applies)."""
    params = inspect.signature(getattr(cli, command)).parameters
    generated = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in generated] == list(C.FIELDS)
    assert all(p.default is None for p in generated)
    assert getattr(cli, command).__annotations__.keys() == params.keys()
    assert "settings" not in params
    decls = [d for p in params.values() for a in p.annotation.__metadata__ if isinstance(a, typer.models.ParameterInfo)
             for d in (a.param_decls or (p.name,))]
    assert len(decls) == len(set(decls))


def test_choices_and_errors_come_from_the_fields():
    assert C.CHOICES == {"head": ("mlp", "linear", "layermix"), "auc_kind": ("logistic", "squared_hinge", "clamped_logistic"),
                         "loss": ("bce", "vs"), "select": ("auc", "video_auc", "loss", "last"),
                         "schedule": ("cosine", "sp_cup"), "video_pool": ("mean", "max", "lse"),
                         "objective": ("dfclip", "sp_cup:erm", "sp_cup:dag", "sp_cup:auc", "sp_cup:vs",
                                       "sp_cup:vs_cvar_auc"),
                         "precision": ("auto", "fp32", "bf16"), "cuda_graphs": ("auto", "on", "off"),
                         "calibration": ("temperature", "platt", "none")}
    assert C.option_name("holdout_sources") == "--holdout-source"
    assert C.option_name("cvar_alpha") == "--cvar-alpha"
    assert C.value_type("hidden") is int and C.value_type("holdout_sources") is str
    assert set(C.SECTION.values()) == {"Head", "Loss", "Optimisation", "Data", "Selection and threshold", "Compute"}


def test_bad_loss_names_the_loss_option(dfhead, tmp_path):
    code, out, err = dfhead("fit", tmp_path / "missing", "--loss", "foo")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--loss must be one of bce, vs, got 'foo'" in lines[0], err
    assert "per-sample" not in err


def test_options_reach_runconfig(dfhead, monkeypatch, tmp_path):
    """fit passes the given options, and only those, to make_config; sweep's lists become the grid."""
    import dfclip.heads.run as run_mod

    seen = {}

    def fake_fit(store_dir, cfg, **kwargs):
        seen["fit"] = cfg
        raise SystemExit(0)

    def fake_sweep(store_dir, cfgs, **kwargs):
        seen["sweep"] = cfgs
        raise SystemExit(0)

    monkeypatch.setattr(run_mod, "fit", fake_fit)
    monkeypatch.setattr(run_mod, "sweep", fake_sweep)
    code, _, err = dfhead("fit", tmp_path, "--cvar-alpha", "0.3", "--no-balanced", "--no-feature-noise",
                          "--objective", "sp_cup:dag", "--hidden", "64", "--holdout-source", "a", "--holdout-source", "b",
                          "--preset", "sp_cup")
    assert code == 0, err
    cfg = seen["fit"]
    sp_cup = C.load_preset("sp_cup")
    assert cfg == dataclasses.replace(C.RunConfig(**sp_cup), cvar_alpha=0.3, balanced=False, feature_noise=False,
                                      objective="sp_cup:dag", hidden=64, holdout_sources=("a", "b"))

    code, _, err = dfhead("sweep", tmp_path, "--cvar-alpha", "0.1,0.5", "--loss", "bce,vs", "--seed", "7",
                          "--seeds", "2", "--balanced", "true", "--holdout-source", "a")
    assert code == 0, err
    cfgs = seen["sweep"]
    assert [(c.cvar_alpha, c.loss, c.seed) for c in cfgs] == [
        (a, loss, s) for a in (0.1, 0.5) for loss in ("bce", "vs") for s in (7, 8)]
    assert all(c.balanced and c.holdout_sources == ("a",) for c in cfgs)
    assert cfgs[0].epochs == C.RunConfig().epochs  # not given: RunConfig's default


def test_sp_cup_preset_is_the_references_main():
    """train_test_clipv1.py's __main__ and argparse defaults, field by field."""
    cfg = C.make_config("sp_cup")
    assert (cfg.objective, cfg.cvar_alpha, cfg.auc_gamma, cfg.feature_noise) == ("sp_cup:vs_cvar_auc", 0.9, 0.6, True)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-5, 6e-5, 256, 100)
    assert (cfg.schedule, cfg.min_lr, cfg.drop_last, cfg.select, cfg.seed) == ("sp_cup", 1e-6, False, "last", 8079)
    assert cfg.threshold == "0.5"  # its evaluate(): predicted = sigmoid >= 0.5
    assert (cfg.head, cfg.depth, cfg.hidden, cfg.dropout, cfg.sam_rho, cfg.balanced, cfg.l2_normalize) == (
        "mlp", 3, None, 0.335, 0.0, False, False)


def test_sp_cup_objectives_refuse_dfclip_loss_options(dfhead, tmp_path):
    code, _, err = dfhead("fit", tmp_path, "--preset", "sp_cup", "--loss", "vs")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--loss applies to --objective dfclip only" in err, err


def test_preset_docs_name_real_options():
    doc = json.loads((C.PRESET_DIR / "sp_cup.json").read_text())["_doc"]
    assert "--objective sp_cup:erm" in doc and "--target-means real" in doc
    options = {C.option_name(n) for n in C.FIELDS}
    for preset in C.PRESET_DIR.glob("*.json"):
        for option in re.findall(r"--[a-z][\w-]*", json.loads(preset.read_text()).get("_doc", "")):
            assert option in options | {"--preset", "--target-means"}, (preset.name, option)  # last: import-h5's


def test_legacy_per_sample_still_loads(tmp_path):
    """Runs written before the rename store "per_sample" in config.json's "run"."""
    assert C.config_from_dict({"per_sample": "vs", "cvar_alpha": 0.3}) == C.RunConfig(loss="vs", cvar_alpha=0.3)
    run = tmp_path / "old-run"
    run.mkdir()
    old = C.RunConfig().to_dict()
    del old["loss"]
    old["per_sample"] = "vs"
    from safetensors.torch import save_file

    from dfclip.heads.models import build_head

    head = build_head("linear", 1, 4)
    (run / "config.json").write_text(json.dumps({"format": "dfclip-run/1", "run": old, "head": head.config,
                                                 "threshold": 0.5, "provenance": {}}))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run / "head.safetensors"))
    assert load_run_config(run)["run"]["loss"] == "vs"
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"per_sample": "vs"}))
    assert C.make_config(str(preset)).loss == "vs"
    with pytest.raises(UserError, match="unknown fields"):
        C.config_from_dict({"per_sampel": "vs"})


def test_typer_errors_are_caught_through_public_api_only(dfhead):
    """cli.py catches typer.TyperException (public since typer 0.27.2, the floor in pyproject.toml),
    never the private typer._click."""
    source = Path(cli.__file__).read_text()
    assert "from typer._click" not in source and "import typer._click" not in source
    assert issubclass(typer.BadParameter, typer.TyperException)
    code, out, err = dfhead("fit", "--no-such-option")
    assert code == 2 and err.startswith("error: ") and "--help" in err and len(err.strip().splitlines()) == 1
    code, out, err = dfhead()  # no arguments: the help page once, exit 2
    assert code == 2 and out.count("Usage:") == 1 and "sweep" in out and not err.strip()
    pyproject = (Path(cli.__file__).parent / "pyproject.toml").read_text()
    assert '"typer>=0.27.2"' in pyproject
