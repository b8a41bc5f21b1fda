"""Command-line entry points `dfembed` and `dfhead`: parse options, call one library function, print.

No logic lives here. Every mistake a user can make surfaces as dfclip.errors.UserError, printed
as one line with a non-zero exit. Heavy imports (torch, open_clip) stay inside the commands so
`--help` and `dfembed info` start fast.
"""

from __future__ import annotations

import inspect
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dfclip.errors import UserError
from dfclip.heads.config import (FIELDS, FIRST_SEED, ONE_VALUE, SECTION, is_list, option_name, shown_default,
                                 value_type)

console = Console(stderr=True)
out = Console()

embed_app = typer.Typer(
    name="dfembed", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Extract frozen CLIP image features once into a resumable HDF5 store.",
)
head_app = typer.Typer(
    name="dfhead", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Train, evaluate and sweep robust detector heads (CVaR, pairwise AUC, SAM) on a store.",
)

DEFAULT_STORE = Path("embeddings")


def _main(app: typer.Typer, interrupted: str) -> None:
    if not sys.argv[1:]:  # no command: the help page, and exit 2 like any other usage error
        app(["--help"], standalone_mode=False)
        sys.exit(2)
    # SIGTERM (kill, a scheduler's timeout) becomes SystemExit, so `finally` blocks and context
    # managers still run: temporary folders go and no half-written file stays behind.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # standalone_mode=False hands usage errors to us, so they print as one line like every other error.
        code = app(standalone_mode=False)
    except UserError as e:
        for line in str(e).splitlines() or [""]:  # several problems (a hand-edited config.json): one line each
            console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as e:
        # Public API only: typer.TyperException (typer >= 0.27.2, hence the floor in pyproject.toml)
        # is the base of the errors typer raises, so nothing is imported from the private typer._click
        # (which typer says may change at any release). Usage errors carry their command as `ctx`.
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx else app.info.name
        console.print(f"[bold red]error:[/] {e.format_message()} (see `{cmd} --help`)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C into a silent exit 130: say what survived
            console.print(f"[yellow]interrupted[/]: {interrupted}")
        raise
    if code == 130:
        console.print(f"[yellow]interrupted[/]: {interrupted}")
    sys.exit(code if isinstance(code, int) else 0)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def dfembed_main() -> None:
    _main(embed_app, "completed shards are kept; re-run the same command to resume")


def dfhead_main() -> None:
    _main(head_app, "training stopped; a run directory is complete only once its command finishes")


# ---------------------------------------------------------------- dfembed

@embed_app.command()
def info(
    store_dir: Annotated[Path, typer.Argument(help="Store directory.")] = DEFAULT_STORE,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Rows, dim, model, per-label and per-source counts, failures and size on disk of a store."""
    from dfclip import store

    s = store.open(store_dir)
    rep = s.info()
    if as_json:
        out.print_json(json.dumps(rep))
        return
    from rich.table import Table

    t = Table(title=f"store {rep['store']}", show_header=False)
    for k in ("rows", "dim", "dtype", "model", "pretrained", "feature", "shards", "failures"):
        t.add_row(k, str(rep[k]))
    tap = s.provenance.get("tap", "resid")
    t.add_row("layers", (", ".join(f"block{b}" for b in rep["layers"]) or "none (only proj)")
              + (f" (tap {tap})" if tap != "resid" else ""))
    t.add_row("perturb", rep["perturb"])
    if rep["failure_kinds"]:
        t.add_row("failures by reason", ", ".join(f"{k}={v}" for k, v in rep["failure_kinds"].items()))
    if rep["videos"] or rep["frames"]:
        video = rep["video_settings"] or {}
        taken = f"every {video['stride']}th frame" if video.get("stride") else f"{video.get('frames') or 'all'} per video"
        t.add_row("videos", f"{rep['videos']} ({rep['frames']} frame rows; {taken})")
    if rep["faces"]:
        f = rep["faces"]
        t.add_row("faces", f"{f['mode']} ({f['detector'].get('name')} {f['detector'].get('version')}, scale {f['scale']}, "
                           f"min score {f['min_score']}, fallback {f['fallback']})")
    names = {"1": "fake", "0": "real", "-1": "unknown"}
    t.add_row("labels", ", ".join(f"{names.get(k, k)}={v}" for k, v in rep["labels"].items()))
    t.add_row("sources", ", ".join(f"{k or '(none)'}={v}" for k, v in rep["sources"].items()))
    t.add_row("size on disk", f"{rep['bytes_on_disk'] / 2**20:.1f} MiB")
    out.print(t)
    notes = []
    if rep["rows"] == 0:
        notes.append("the store has 0 rows (every input failed or was pruned)")
    if rep["non_finite"]:
        notes.append(f"{rep['non_finite']} rows have NaN or inf embeddings (written by another tool); "
                     "training and scoring refuse them")
    if rep["missing_inputs"]:
        notes.append(f"{rep['missing_inputs']} rows are missing: their images are gone from {rep['input_root']}; "
                     "`dfembed extract ... --prune-missing` drops them")
    if rep["missing_failures"]:
        notes.append(f"{rep['missing_failures']} logged failures are of images gone from {rep['input_root']}; "
                     "`dfembed extract ... --prune-missing` drops them")
    if rep["source_case_clashes"]:
        shown = "; ".join(" / ".join(group) for group in rep["source_case_clashes"][:3])
        notes.append(f"source names differ only in case ({shown}): they are separate sources and --holdout-source "
                     "matches names exactly")
    if rep["unfinished_import_shards"]:
        notes.append(f"{rep['unfinished_import_shards']} shards of an interrupted import are ignored; "
                     "re-run the import (the next writer deletes them)")
    for note in notes:
        out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)


@embed_app.command("import-h5")
def import_h5(
    h5_file: Annotated[Path, typer.Argument(help="HDF5 file holding an N x D feature dataset (e.g. cup_train.h5).")],
    csv: Annotated[Path, typer.Option(help="Labels CSV whose rows are in the dataset's order.")],
    dataset: Annotated[str, typer.Option(help="Dataset name inside the .h5 (SP_CUP: train_features / test_features).")] = "train_features",
    out_dir: Annotated[Path, typer.Option("--out", help="Store directory to write.")] = DEFAULT_STORE,
    column: Annotated[Optional[list[str]], typer.Option(help="OURS=THEIRS, e.g. 'path=Image Path', 'label=Target', 'source=Gen'.")] = None,
    target_means: Annotated[str, typer.Option(help="What Target 1 means: fake (SP_CUP) or real.")] = "fake",
    split: Annotated[str, typer.Option(help="Split of every row when no split column is mapped, e.g. train / val.")] = "",
    split_map: Annotated[Optional[list[str]], typer.Option(
        help="Map a split value of the CSV to train, val or test, VALUE=SPLIT, repeatable: --split-map training=train.")] = None,
    model: Annotated[str, typer.Option(help="Model that made the features (recorded as declared).")] = "ViT-L-14",
    pretrained: Annotated[str, typer.Option(help="Its weights (recorded as declared).")] = "openai",
    feature: Annotated[str, typer.Option(help="proj (CLIP embedding) or pre (before the projection).")] = "proj",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 or float32.")] = "float16",
) -> None:
    """Import features you already extracted (SP_CUP-style .h5 + labels CSV) into a store."""
    from dfclip.store.format import parse_column_map, parse_split_map
    from dfclip.store.importer import import_h5 as run_import

    rep = run_import(h5_file, csv, dataset=dataset, out=out_dir, columns=parse_column_map(column or []),
                     target_means=target_means, split=split, split_map=parse_split_map(split_map or []), model=model,
                     pretrained=pretrained, feature=feature, dtype=dtype)
    labels = rep["labels"]
    of = f" of {rep['file_rows']} in the file" if rep["file_rows"] != rep["rows"] else ""
    out.print(f"imported {rep['rows']} rows{of} (fake={labels['1']}, real={labels['0']}, unknown={labels['-1']}) "
              f"of dim {rep['dim']} into {rep['store']} ({rep['shards']} shards)", highlight=False)
    if rep["duplicate_paths"]:
        console.print(f"[yellow]note[/]: {rep['duplicate_paths']} paths appear more than once; the last row of each is kept")
    if rep["non_finite_message"]:
        console.print(f"warning: {rep['non_finite_message']}", highlight=False, markup=False, soft_wrap=True)


EXTRACT_EPILOG = (
    "Examples: `dfembed extract ./images` (labels from real/ and fake/ folders); "
    "`dfembed extract --manifest cup.csv --column 'path=Image Path' --column label=Target`; "
    "multi-GPU: `torchrun --nproc-per-node N $(which dfembed) extract ./images` (each rank writes its own shards). "
    "Re-running the same command resumes: images already in the store (same path, size and mtime) are skipped."
)


@embed_app.command("extract", epilog=EXTRACT_EPILOG)
def extract_cmd(
    images_dir: Annotated[Optional[Path], typer.Argument(
        help="Folder of images (every type Pillow opens here: jpg, png, webp, tif, ..., avif or heic where it reads them) "
             "and videos (mp4, avi, mov, mkv, webm, ...); labels from real/fake folder names, "
             "source from the folder under them. Omit when using --manifest.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Store directory (created or resumed).")] = DEFAULT_STORE,
    manifest: Annotated[Optional[Path], typer.Option(
        help="CSV/TSV/Parquet with columns path, label and optional source, split, group (instead of IMAGES_DIR).")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Folder the manifest's paths are relative to (default: the manifest's folder).")] = None,
    column: Annotated[Optional[list[str]], typer.Option(
        help="Map a manifest column, OURS=THEIRS, repeatable: --column 'path=Image Path' --column label=Target.")] = None,
    target_means: Annotated[str, typer.Option(
        help="What label 1 means in the manifest: fake (default) or real (flips 0/1).")] = "fake",
    split_map: Annotated[Optional[list[str]], typer.Option(
        help="Map a manifest split value to train, val or test, VALUE=SPLIT, repeatable: --split-map training=train. "
             "Splits other than train/val/valid/validation/test (any case) or empty are refused without one.")] = None,
    model: Annotated[str, typer.Option(envvar="DFCLIP_MODEL",
        help="open_clip model name (ViT-L-14 is the paper's; PE-Core-*, *-worldwide), dfclip-tiny for tests, "
             "a model-config .json, or a timm model with timm's own preprocessing: timm:NAME.TAG, e.g. "
             "timm:vit_large_patch14_dinov2.lvd142m.")] = "ViT-L-14",
    pretrained: Annotated[str, typer.Option(envvar="DFCLIP_PRETRAINED",
        help="open_clip tag (openai), a checkpoint file (.safetensors/.pt/.bin/OpenAI .pt archive), or none. "
             "timm: the tag in the name (this default), a checkpoint file, or none.")] = "openai",
    feature: Annotated[str, typer.Option(
        help="proj: after CLIP's projection (SP_CUP); pre: before it. timm: proj is the model's output, "
             "pre the pooled token before its head (the same where the head is Identity, e.g. DINOv2).")] = "proj",
    quick_gelu: Annotated[Optional[bool], typer.Option(
        "--quick-gelu/--no-quick-gelu", help="Force the activation; default picks QuickGELU for OpenAI weights.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where tagged weights are cached / downloaded.")] = None,
    precision: Annotated[str, typer.Option(help="auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun ranks use LOCAL_RANK).")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(
        help="Images per batch.", show_default="256 on GPU, 64 on CPU")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Decode processes per rank, 0 = decode in the main process.", show_default="cores per rank - 1, max 16")] = None,
    shard_size: Annotated[int, typer.Option(help="Rows per HDF5 shard (a killed run redoes at most one shard).")] = 16384,
    dtype: Annotated[str, typer.Option(help="Stored embedding dtype: float16 or float32.")] = "float16",
    layers: Annotated[str, typer.Option(
        help="Also store the class token after these transformer blocks (1-based) as features/block{i}: "
             "8,16,24, all, or every:4. Part of the store's identity.", show_default="none")] = "",
    tap: Annotated[str, typer.Option(
        help="Where --layers reads each block: resid (the residual stream after it) or ln2 (its second "
             "LayerNorm's output, as RINE). Part of the store's identity.")] = "resid",
    perturb: Annotated[str, typer.Option(
        help="Degrade each decoded image before preprocessing, for a robustness store: jpeg:75, resize:0.5, "
             "blur:1.0, noise:0.02, or composed: jpeg:75+resize:0.5. Deterministic per path; part of the "
             "store's identity.", show_default="none")] = "",
    frames: Annotated[str, typer.Option(
        help="Frames per video, spread evenly over it (DeepfakeBench takes 32), or all. Part of the store's "
             "identity.", rich_help_panel="Videos and faces")] = "32",
    frame_stride: Annotated[Optional[int], typer.Option(
        help="Take every S-th frame instead of --frames.", rich_help_panel="Videos and faces")] = None,
    faces: Annotated[str, typer.Option(
        help="none: whole images and frames; largest: the largest face of each; all: one row per face. Faces are "
             "aligned on 5 landmarks and cropped at the model's input size.",
        rich_help_panel="Videos and faces")] = "none",
    face_detector: Annotated[str, typer.Option(
        help="Registered face detector (mtcnn: facenet-pytorch's MTCNN, weights in its wheel).",
        rich_help_panel="Videos and faces")] = "mtcnn",
    face_scale: Annotated[float, typer.Option(
        help="Crop margin around the aligned face (1.3 as DeepfakeBench).", rich_help_panel="Videos and faces")] = 1.3,
    min_face_score: Annotated[float, typer.Option(
        help="Drop detections less confident than this.", rich_help_panel="Videos and faces")] = 0.9,
    min_face_size: Annotated[float, typer.Option(
        help="Drop faces whose box is smaller than this many pixels (shorter side).",
        rich_help_panel="Videos and faces")] = 0.0,
    face_fallback: Annotated[str, typer.Option(
        help="none: a frame without a face is a failure no_face; center: a centre crop instead (row marked n_faces 0; "
             "with --faces largest).", rich_help_panel="Videos and faces")] = "none",
    detections: Annotated[Optional[Path], typer.Option(
        help="Reuse the face detections of this store (same files, same detector) instead of detecting again.",
        rich_help_panel="Videos and faces")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Try images logged as failures again.")] = False,
    prune_missing: Annotated[bool, typer.Option(
        "--prune-missing", help="Drop stored images that are gone from the input (listed by `dfembed info`).")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Embed every image of IMAGES_DIR (or --manifest) with a frozen CLIP image tower into a resumable store."""
    from dfclip.embed import EmbedConfig, extract
    from dfclip.store.format import parse_column_map, parse_split_map

    config = EmbedConfig(model=model, pretrained=pretrained, feature=feature, quick_gelu=quick_gelu,
                         cache_dir=cache_dir, precision=precision, device=device, batch_size=batch_size,
                         workers=workers, shard_size=shard_size, dtype=dtype, layers=layers, tap=tap, perturb=perturb,
                         frames=frames, frame_stride=frame_stride, faces=faces, face_detector=face_detector,
                         face_scale=face_scale, min_face_score=min_face_score, min_face_size=min_face_size,
                         face_fallback=face_fallback, detections=str(detections) if detections else None)
    rep = extract(images_dir, out_dir, config, manifest=manifest, root=root, columns=parse_column_map(column or []),
                  target_means=target_means, split_map=parse_split_map(split_map or []), retry_failed=retry_failed,
                  prune_missing=prune_missing, progress=progress)
    from rich.markup import escape

    tag = f"[rank {rep['rank']}/{rep['world_size']}] " if rep["world_size"] > 1 else ""
    skipped = f"{rep['skipped']} skipped as already done"
    if rep["skipped_failures"]:
        skipped += f" ({rep['skipped_failures']} logged failures; --retry-failed tries them again)"
    if rep["relabelled"]:
        skipped += f", {rep['relabelled']} relabelled to match the inputs"
    if rep["pruned"]:
        skipped += f", {rep['pruned']} gone from the input pruned"
    if rep["frames"]:
        skipped += f" | {rep['frames']} frames read"
        if rep["no_face"]:
            skipped += f", {rep['no_face']} without a face (failure no_face)"
    out.print(f"{tag}done: {rep['embedded']} embedded, {rep['failed']} failed, {skipped} "
              f"| {rep['wall_s']:.1f} s, {rep['images_per_s']:.1f} images/s on {rep['device']} ({rep['precision']}) "
              f"| store {rep['store']}", markup=False, highlight=False)
    if rep["failed"]:
        console.print(f"{escape(tag)}[yellow]{rep['failed']} images, frames or faces could not be embedded[/]"
                      f"{f' ({n} with NaN or inf values)' if (n := rep['non_finite']) else ''}; "
                      f"reasons in {escape(str(rep['failures_file']))}", highlight=False)
    if rep["missing"]:
        console.print(f"{escape(tag)}[yellow]{rep['missing']} stored images are gone from the input[/] "
                      f"(e.g. {escape(', '.join(rep['missing_examples']))}); they stay in the store until "
                      "`--prune-missing` drops them", highlight=False, soft_wrap=True)


@embed_app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder to write the demo images into.")] = Path("images"),
    n_per_source: Annotated[int | None, typer.Option(
        help="Images per fake source (real sources get half); with --videos, videos per source.",
        show_default="40 images, 4 videos")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical images.")] = 0,
    videos: Annotated[bool, typer.Option(
        "--videos", help="Write short mp4 videos of a real face photo (scikit-image's astronaut) instead, "
        "for `dfembed extract --faces`.")] = False,
) -> None:
    """Write a small labelled demo image folder (cartoon faces: 2 real and 3 fake sources) to try dfclip on."""
    import shlex

    from dfclip.embed.demo import make_demo_images, write_demo_videos

    if videos:
        folder = write_demo_videos(out_dir, n_per_source=4 if n_per_source is None else n_per_source, seed=seed)
        n = sum(1 for _ in folder.rglob("*.mp4"))
        out.print(f"wrote {n} demo videos and manifest.csv to {folder}\nnext (offline, tiny random-init model):\n"
                  f"  dfembed extract {shlex.quote(str(out_dir))} --frames 8 --faces largest "
                  "--model dfclip-tiny --pretrained none\n  dfhead fit --cvar-alpha 0.3", highlight=False, soft_wrap=True)
        return
    folder = make_demo_images(out_dir, n_per_source=40 if n_per_source is None else n_per_source, seed=seed)
    n = sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "manifest.csv")
    out.print(f"wrote {n} demo images and manifest.csv to {folder}", highlight=False)
    images = shlex.quote(str(out_dir))  # the hints must paste as they are, even with spaces in the path
    out.print("next, with OpenAI CLIP ViT-L-14 weights reachable (online or cached):\n"
              f"  dfembed extract {images}\n  dfhead fit --cvar-alpha 0.3\n"
              "offline, the tiny random-init model checks the whole pipeline (its scores mean nothing):\n"
              f"  dfembed extract {images} --model dfclip-tiny --pretrained none\n  dfhead fit --cvar-alpha 0.3",
              highlight=False)


# ---------------------------------------------------------------- dfhead

# `fit` and `sweep` take one option per RunConfig field, generated from the fields (their type,
# help, choices and sweep behaviour live in heads/config.py) instead of being written out here.
# Every generated option defaults to None, "not given": the preset's value, else RunConfig's
# default applies; --help shows RunConfig's default.


def _sweep_takes_list(name: str) -> bool:
    """sweep takes a comma list of this field (text, parsed by parse_grid_values), not one typed value.

    val_frac and split_seed are comma lists too, so that a list of them gets training's one-line
    "must be one value for a whole sweep" error instead of a parse error.
    """
    return not is_list(name) and FIELDS[name].metadata["sweep"] != FIRST_SEED


def _setting_parameter(name: str, command: str) -> inspect.Parameter:
    """The typer option of RunConfig field `name` in `command` (fit or sweep), as a keyword-only parameter."""
    meta = FIELDS[name].metadata
    option, help_text, shown = option_name(name), meta["help"], shown_default(name)
    decls = [option]
    if is_list(name):  # holdout_sources: a repeatable option, in fit and sweep alike
        kind = list[value_type(name)]
        if command == "sweep":
            help_text += " One set for the whole sweep."
    elif command == "fit":
        kind = value_type(name)
        if kind is bool:
            decls = [f"{option}/--no-{option[2:]}"]
            shown = option[2:] if FIELDS[name].default else f"no-{option[2:]}"
    elif _sweep_takes_list(name):
        kind = str
        help_text += " One value for the whole sweep." if meta["sweep"] == ONE_VALUE else " Comma list."
    else:  # the seed
        kind = value_type(name)
        help_text += " The first seed: --seeds N trains seed, seed+1, ..."
    typer_option = typer.Option(*decls, help=help_text, show_default=shown, rich_help_panel=SECTION[name])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], typer_option])


def with_settings(command: str):
    """Decorator giving a dfhead command one option per RunConfig field.

    The decorated function has its hand-written parameters plus a keyword-only `settings`: the
    fields given on the command line, {field: value}. Typer reads a command's options from
    inspect.signature() and the annotations, so the wrapper carries a built __signature__ (the
    hand-written parameters, then one parameter per field) and matching __annotations__.
    """
    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "settings"]
        params = own + [_setting_parameter(name, command) for name in FIELDS]

        def command_fn(**kwargs):
            given = {name: kwargs.pop(name) for name in FIELDS}
            settings = {name: tuple(v) if is_list(name) else v for name, v in given.items()
                        if v is not None and not (is_list(name) and not v)}
            return fn(**kwargs, settings=settings)

        command_fn.__name__, command_fn.__qualname__ = fn.__name__, fn.__qualname__
        command_fn.__doc__, command_fn.__module__ = fn.__doc__, fn.__module__
        command_fn.__signature__ = inspect.Signature(params)
        command_fn.__annotations__ = {p.name: p.annotation for p in params}
        return command_fn

    return decorate


WITH_HELP = ("Fuse this store (the same images embedded by another backbone) with STORE, joined by path; repeat "
             "for more. --feature then applies to each store (proj = every store's proj, concatenated), or names "
             "each part's store by its folder name: --feature st_clip:proj+st_dino:block12. Rows held by some of "
             "the stores only are left out (one note line); labels, sources, splits and groups must agree.")
WITH_EVAL_HELP = ("For a run trained on fused stores: its other backbones' stores of the same images as --store, in "
                  "the run's order (repeatable).")
FUSION_NOTE = ("Fusing backbones: dfhead fit st_clip --with st_dino trains on both stores' proj, concatenated; "
               "--feature st_clip:proj+st_dino:proj --head layermix learns weights over them (parts of one width).")

REFERENCE_NOTE = ("The reference code (SP_CUP) trains with lr 1e-5, wd 6e-5, batch 256, 100 epochs: "
                  "use --preset sp_cup for those. --preset paper is CVaR 0.3 + AUC 0.5 + SAM 0.05 + feature noise.")


@head_app.command(epilog=REFERENCE_NOTE + " " + FUSION_NOTE)
@with_settings("fit")
def fit(
    store_dir: Annotated[Path, typer.Argument(help="Store to train on (from `dfembed extract`).")] = DEFAULT_STORE,
    preset: Annotated[Optional[str], typer.Option(help="Start from heads/configs/NAME.json (paper, sp_cup) or a JSON file; flags override it.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: writes RUNS_DIR/NAME/ (an existing NAME is replaced). Default: from the settings, with -2, -3 ... added rather than replace an earlier run.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go.")] = Path("runs"),
    val_store: Annotated[Optional[Path], typer.Option(help="Validate on this store instead of a split of the train store.")] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda, cuda:1 ...")] = "auto",
    with_stores: Annotated[Optional[list[Path]], typer.Option("--with", metavar="STORE", help=WITH_HELP, show_default="none")] = None,
    *,
    settings: dict,
) -> None:
    """Train one detector head on a store (or on fused stores, --with) and write runs/NAME/ (config, weights,
    metrics, report, plots)."""
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit as fit_run

    cfg = make_config(preset, **settings)
    run_dir = fit_run(store_dir, cfg, val_store=val_store, runs_dir=runs_dir, name=name, device=device,
                      log=_say, progress=True, with_stores=with_stores or [])
    _print_report(run_dir)


def _print_report(run_dir: Path) -> None:
    rep = json.loads((run_dir / "report.json").read_text())
    from rich.table import Table

    t = Table(title=f"{run_dir}  (best epoch {rep['best_epoch']}, threshold {rep['threshold']:.4g})")
    t.add_column("set")
    cols = ("n", "auc", "ap", "eer", "acc", "balanced_acc", "f1_macro", "tpr@fpr=0.01")
    for c in cols:
        t.add_column(c, justify="right")
    fmt = lambda v: "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}")
    for name in ("val", "holdout", "test"):
        if rep.get(name):
            t.add_row(name, *(fmt(rep[name].get(c)) for c in cols))
            if rep[name].get("video"):
                t.add_row(f"{name} video", *(fmt(rep[name]["video"].get(c)) for c in cols))
    out.print(t)
    rates = [f"{name} FPR {fmt(rep[name]['fpr@threshold'])} TPR {fmt(rep[name]['tpr@threshold'])}"
             for name in ("val", "holdout", "test") if "fpr@threshold" in (rep.get(name) or {})]
    if rates:
        out.print(f"at threshold {rep['threshold']:.4g}: " + "; ".join(rates), highlight=False)
    _print_calibration(rep, fmt)
    pooled = {_pooling(rep[name]["video"]) for name in ("val", "holdout") if (rep.get(name) or {}).get("video")}
    if pooled:  # one pooling per run
        out.print(f"video rows: one score per video, its frames' scores pooled by {pooled.pop()}", highlight=False)
    for name in ("val", "holdout"):
        ps = (rep.get(name) or {}).get("per_source") or {}
        if ps:
            out.print(f"{name} per source: " + ", ".join(
                f"{s or '(none)'} auc={fmt(v['auc'])} acc={fmt(v['acc'])} n={v['n']}" for s, v in ps.items()))


def _print_calibration(rep: dict, fmt) -> None:
    """ECE, NLL and Brier of each set, raw -> calibrated, and the fitted map (report.json "calibration")."""
    cal = rep.get("calibration")
    if not cal:
        return
    how = {"temperature": f"temperature T={cal['temperature']:.4g}", "none": "none (scores as trained)",
           "platt": f"platt a={cal['a']:.4g} b={cal['b']:.4g}"}[cal["method"]]
    threshold = f", threshold {cal['threshold']:.4g} in the calibrated scale" if cal.get("threshold") is not None else ""
    out.print(f"calibration (fitted on val): {how}{threshold}", highlight=False)
    for name in ("val", "holdout", "test"):
        c = (rep.get(name) or {}).get("calibration")
        if c:
            out.print(f"  {name}: " + ", ".join(f"{k.upper() if k != 'brier' else 'Brier'} {fmt(c['before'][k])} -> "
                                               f"{fmt(c['after'][k])}" for k in ("ece", "nll", "brier")),
                      highlight=False)


def _pooling(video: dict) -> str:
    """How a report's video-level numbers pooled the frames: "mean", "max", "lse T=0.1"."""
    pool = video.get("pool", "mean")  # reports written before pooling was a setting used the mean
    return f"lse T={video['temperature']:g}" if pool == "lse" else pool


POOL_HELP = "How a video's frame scores become its score: mean, max or lse (log-sum-exp with --temperature)."
TEMPERATURE_HELP = "Temperature of --pool lse, in probability units (small: near the max; large: near the mean)."


@head_app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run directory written by `dfhead fit` or a sweep's best/.")],
    store_dirs: Annotated[Optional[list[Path]], typer.Option("--store", help="Store to evaluate on (same model as the run); repeat it for a robustness table over clean and perturbed stores. Default: the run's own validation report.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    split: Annotated[Optional[str], typer.Option(help="Only the stores' rows of this split (e.g. test).", show_default="every labelled row")] = None,
    precision: Annotated[str, typer.Option(help="Head matmuls: auto (bf16 on CUDA and CPUs with native bf16, else fp32), fp32 or bf16.")] = "auto",
    pool: Annotated[Optional[str], typer.Option(help=POOL_HELP + " For the video-level metrics of a --store.", show_default="the run's --video-pool")] = None,
    temperature: Annotated[Optional[float], typer.Option(help=TEMPERATURE_HELP, show_default="the run's --pool-temperature")] = None,
    include_train: Annotated[bool, typer.Option("--include-train", help="Also score the rows the run trained on (its own store, or perturbed copies of its images, matched on path); left out by default, as their metrics are optimistic.")] = False,
    with_stores: Annotated[Optional[list[Path]], typer.Option("--with", metavar="STORE", help=WITH_EVAL_HELP + " Each --store is fused with them.", show_default="none")] = None,
) -> None:
    """Metrics of a trained run on any labelled store of the same model (AUC, AP, EER, TPR@FPR, per source, per video).

    Rows the run trained on are left out (a note gives their count) unless --include-train.
    With several --store (e.g. clean, jpeg75, blur1 from `dfembed extract --perturb`): one table of AUC, AP, EER and
    accuracy per store, also written to RUN/robustness.parquet and RUN/robustness.png when RUN can be written.
    """
    from dfclip.heads.run import evaluate_run, evaluate_stores, write_robustness

    with_stores = with_stores or []
    if with_stores and not store_dirs:
        raise UserError("--with adds stores to a --store; give --store STORE too")
    if store_dirs and len(store_dirs) > 1:
        if pool is not None or temperature is not None:
            raise UserError("--pool and --temperature set the video-level metrics of one --store; the robustness "
                            "table over several has none")
        table = evaluate_stores(run, store_dirs, device=device, split=split, precision=precision,
                                include_train=include_train, write=False, log=_warn, with_stores=with_stores)
        written = write_robustness(table, run, log=_warn)
        if as_json:
            out.print_json(json.dumps(table.to_dicts()))
            return
        from rich.table import Table

        t = Table(title=f"{run}: robustness")
        for c in ("store", "perturb", "n", "auc", "ap", "eer", "acc"):
            t.add_column(c, justify="left" if c in ("store", "perturb") else "right")
        for r in table.iter_rows(named=True):
            t.add_row(r["store"], r["perturb"], str(r["n"]),
                      *("-" if r[c] is None else f"{r[c]:.4f}" for c in ("auc", "ap", "eer", "acc")))
        out.print(t)
        if written:
            out.print(f"wrote {' and '.join(map(str, written))}", highlight=False)
        return
    store_dir = store_dirs[0] if store_dirs else None
    if split is not None and store_dir is None:
        raise UserError("--split selects rows of a --store; give --store STORE")
    if (pool is not None or temperature is not None) and store_dir is None:
        raise UserError("--pool and --temperature re-score a --store (the run's report used its own --video-pool); "
                        "give --store STORE")
    rep = evaluate_run(run, store_dir, device=device, split=split, precision=precision, include_train=include_train,
                       log=_warn, pool=pool, temperature=temperature, with_stores=with_stores)
    if as_json:
        out.print_json(json.dumps(rep))
        return
    rep = rep.get("val", rep) if store_dir is None else rep
    show = lambda v: "-" if v is None else v  # an undefined metric (e.g. recall of a class the store lacks)
    for k, v in rep.items():
        if not isinstance(v, dict):
            out.print(f"{k:>16}  {show(v)}")
    for s, v in (rep.get("per_source") or {}).items():
        out.print(f"{'source ' + (s or '(none)'):>16}  auc={show(v['auc'])}  acc={show(v['acc'])}  n={v['n']}")
    if rep.get("calibration"):
        c = rep["calibration"]
        for k in ("ece", "nll", "brier"):
            out.print(f"{k:>16}  {show(c['before'][k])} raw, {show(c['after'][k])} calibrated ({c['method']})",
                      highlight=False)
    if rep.get("video"):
        v = rep["video"]
        out.print(f"{'video':>16}  auc={show(v['auc'])}  ap={show(v['ap'])}  eer={show(v['eer'])}  acc={show(v['acc'])}  "
                  f"n={v['n']} videos  (frames pooled by {_pooling(v)})", highlight=False, soft_wrap=True)


@head_app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory, or a one-file detector from `dfhead export`.")],
    images: Annotated[Optional[Path], typer.Argument(help="Folder of images (or one image) to score; embedded with the run's own model and preprocessing.")] = None,
    store_dir: Annotated[Optional[Path], typer.Option("--store", help="Score every row of this store instead of images.")] = None,
    out_csv: Annotated[Path, typer.Option("--out", help="CSV to write: path, score (the run's calibrated probability of fake), pred (1 fake, 0 real), label.")] = Path("scores.csv"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    precision: Annotated[str, typer.Option(help="Head matmuls: auto (bf16 on CUDA and CPUs with native bf16, else fp32), fp32 or bf16.")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoding workers when embedding images.")] = 2,
    pool: Annotated[Optional[str], typer.Option(help=POOL_HELP, show_default="the run's --video-pool")] = None,
    temperature: Annotated[Optional[float], typer.Option(help=TEMPERATURE_HELP, show_default="the run's --pool-temperature")] = None,
    frame_scores: Annotated[Optional[Path], typer.Option(help="Also write every scored frame (or face) to this CSV: path, video, frame, face_index, score, label.")] = None,
    with_stores: Annotated[Optional[list[Path]], typer.Option("--with", metavar="STORE", help=WITH_EVAL_HELP, show_default="none")] = None,
    score_means: Annotated[str, typer.Option(help="fake: the score column is P(fake). real: the column is score_real = 1 - P(fake) (higher means real, as DFWild-Cup scores); pred stays 1 = fake.")] = "fake",
) -> None:
    """Score a store or images and videos with a trained run, using the threshold chosen at fit time.

    Scores are the run's calibrated P(fake) (--calibration at fit time); the predicted labels are those of the
    uncalibrated scores at the run's threshold, which calibration never changes. IMAGES are embedded with every
    backbone the run used (one for most runs; each fused store's for a run trained with --with); a --store of a
    fused run takes the other stores with --with.

    A video gets one row (path, n_frames, n_faces, score, pred, label): its frames' scores pooled by
    --pool; still images keep one row each. Images that cannot be read are listed with their reason in
    OUT's sibling NAME.failures.csv; when none can be scored the command fails. One process embeds
    every file, whatever RANK and WORLD_SIZE say, unless torchrun started it; under torchrun the ranks
    share the files and rank 0 writes one OUT: torchrun --nproc-per-node N $(which dfhead) predict RUN IMAGES.
    """
    from dfclip.heads.report import check_writable_file

    if (images is None) == (store_dir is None):
        raise UserError("give either IMAGES (a folder or file) or --store STORE, not both")
    if with_stores and store_dir is None:
        raise UserError("--with adds stores to a --store; IMAGES are embedded with every backbone of the run by itself")
    check_writable_file(out_csv, "--out")
    if frame_scores is not None:
        check_writable_file(frame_scores, "--frame-scores")
    pooling = {"pool": pool, "temperature": temperature, "frame_scores": frame_scores, "score_means": score_means}
    failures_csv = out_csv.with_name(f"{out_csv.stem}.failures.csv")
    failures_csv.unlink(missing_ok=True)  # never leave an earlier run's failures beside new scores
    if images is not None:
        from dfclip.pipeline import predict_images

        df = predict_images(run, images, device=device, workers=workers, failures_csv=failures_csv, precision=precision,
                            log=_warn, **pooling)
    else:
        from dfclip.heads.run import predict_store
        from dfclip.runtime import without_stray_ranks

        with without_stray_ranks(_warn):  # a stray LOCAL_RANK would pick the GPU
            df = predict_store(run, store_dir, device=device, precision=precision, log=_warn,
                               with_stores=with_stores or [], **pooling)
    from dfclip.runtime import own_rank

    if own_rank().rank != 0:  # under torchrun every rank holds all the rows: rank 0 writes them
        return
    df.write_csv(out_csv)
    n_fake = int(df["pred"].sum())
    means = "; its score_real column is 1 - P(fake), higher means real" if score_means == "real" else ""
    out.print(f"wrote {out_csv}: {df.height} rows, {n_fake} predicted fake, {df.height - n_fake} predicted real{means}",
              highlight=False)
    if images is not None and images.is_file() and "n_frames" in df.columns and df.height == 1:  # one video
        from dfclip.heads.report import load_run_config
        from dfclip.heads.run import run_pooling

        v = df.row(0, named=True)
        used = run_pooling(load_run_config(run), pool, temperature)
        how = f"lse T={used[1]:g}" if used[0] == "lse" else used[0]
        faces = f", {v['n_faces']} faces" if v["n_faces"] != v["n_frames"] else ""  # one row per frame: say frames
        score = f"score {v['score']:.4f}" if "score" in v else f"score_real {v['score_real']:.4f}"
        out.print(f"{v['path']}: {'fake' if v['pred'] else 'real'}, {score} "
                  f"({how} over {v['n_frames']} frames{faces})", highlight=False, soft_wrap=True)
    if failures_csv.is_file():
        import polars as pl

        failed = pl.read_csv(failures_csv)
        reasons = ", ".join(f"{n} {k}" for k, n in failed["error"].value_counts(sort=True).iter_rows())
        _warn(f"{failed.height} images could not be read ({reasons}): not scored, listed in {failures_csv}")


@head_app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `dfhead fit` or a sweep's best/.")],
    out_file: Annotated[Path, typer.Argument(metavar="OUT", help="File to write, e.g. detector.dfclip.")],
) -> None:
    """Write a run as ONE file (safetensors, no pickle): head weights, settings, threshold, calibration and the
    backbone's provenance. Use it with `dfhead predict OUT IMAGES` or `dfclip.Detector.load(OUT)`."""
    from dfclip.heads.export import export_run

    path = export_run(run, out_file)
    out.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)


def _say(line) -> None:
    """A progress or summary line of fit and sweep on stdout: never wrapped (a long path stays on one line,
    the terminal folds it), never read as markup (a path may hold [brackets]). Tables print as tables."""
    if isinstance(line, str):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(line)


def _warn(line: str) -> None:
    """A warning from the library (dropped rows, unreadable images) on stderr, one line."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _full_floats(df, columns):
    """Settings columns as text in full (alpha 1e-05, not 0.0000 at the table's 4 decimals)."""
    import polars as pl

    return df.with_columns(pl.col(c).map_elements(lambda v: f"{v:g}", return_dtype=pl.Utf8)
                           for c in columns if c in df.columns and df[c].dtype.is_float())


@head_app.command()
def runs(
    runs_dir: Annotated[Path, typer.Argument(help="Directory holding run directories.")] = Path("runs"),
) -> None:
    """List and compare run directories (newest first)."""
    from dfclip.heads.run import list_runs

    import polars as pl

    with pl.Config(tbl_rows=200, tbl_cols=20, float_precision=4, tbl_width_chars=160):
        out.print(_full_floats(list_runs(runs_dir), ("alpha", "gamma", "rho", "lr")))


@head_app.command(epilog="Memory: the embeddings once plus, per head, about 6x its weights and a batch of "
                          "activations (an MLP-768 head at batch 256 is ~60 MB, so K=24 needs ~1.5 GB beyond the "
                          "data). A grid that cannot fit is refused before training; split it into smaller sweeps. "
                          "Under torchrun each rank trains a disjoint slice of the grid and rank 0 merges: "
                          "torchrun --nproc-per-node N $(which dfhead) sweep ...")
@with_settings("sweep")
def sweep(
    store_dir: Annotated[Path, typer.Argument(help="Store to train on.")] = DEFAULT_STORE,
    name: Annotated[str, typer.Option(help="Sweep name: writes RUNS_DIR/NAME/ (leaderboard.parquet, heatmap, best/), replacing a sweep of that name.")] = "sweep",
    preset: Annotated[Optional[str], typer.Option(help="Base settings (paper, sp_cup or a JSON file); list options override.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per configuration (seed, seed+1, ...): the leaderboard reports mean and std.")] = 1,
    runs_dir: Annotated[Path, typer.Option(help="Where sweep directories go.")] = Path("runs"),
    val_store: Annotated[Optional[Path], typer.Option(help="Validate on this store.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    halving: Annotated[bool, typer.Option("--halving", help="Successive halving: train all configs to --min-epochs, keep the best 1/eta by --select on val, go on at min_epochs x eta^k epochs up to --epochs. The leaderboard's stop_epoch says where each stopped; best/ is a full-length run. Under torchrun each rank halves its own slice.", rich_help_panel="Successive halving")] = False,
    eta: Annotated[Optional[int], typer.Option(help="With --halving: keep the best 1/eta at each rung (>= 2).", show_default="3", rich_help_panel="Successive halving")] = None,
    min_epochs: Annotated[Optional[int], typer.Option(help="With --halving: epochs of the first rung (1..--epochs).", show_default="1", rich_help_panel="Successive halving")] = None,
    with_stores: Annotated[Optional[list[Path]], typer.Option("--with", metavar="STORE", help=WITH_HELP + " A --feature list compares backbones and their fusion on the same rows: --feature st_clip:proj,st_dino:proj,proj.", show_default="none")] = None,
    *,
    settings: dict,
) -> None:
    """Train a whole grid of heads at once (same options as fit, as comma lists) and print a leaderboard.

    Example: dfhead sweep --cvar-alpha 0.1,0.3,0.5,1 --auc-gamma 0,0.3,0.6 --sam-rho 0,0.05 --seeds 3
    """
    from dfclip.heads.config import make_config, parse_grid_values
    from dfclip.heads.run import grid, sweep as sweep_run

    if not halving and (eta is not None or min_epochs is not None):
        raise UserError("--eta and --min-epochs set successive halving: add --halving")
    # comma lists become grid axes; the first seed and the holdout sources go into the base config
    lists = {k: settings.pop(k) for k in list(settings) if _sweep_takes_list(k)}
    cfgs = grid(make_config(preset, **settings), seeds=seeds, **parse_grid_values(lists))
    from dfclip.runtime import rank_from_env

    if rank_from_env().rank == 0:
        out.print(f"sweep {name}: {len(cfgs)} heads")
    out_dir, board = sweep_run(store_dir, cfgs, val_store=val_store, runs_dir=runs_dir, name=name, device=device,
                               log=_say, progress=True, halving=halving, with_stores=with_stores or [],
                               **{k: v for k, v in (("eta", eta), ("min_epochs", min_epochs)) if v is not None})
    if board.height:
        from dfclip.heads.report import varying_columns

        import polars as pl

        settings = [c for c in varying_columns(board) if c != "seed"]
        show = settings + ["seeds"] + (["diverged"] if "diverged" in board.columns and board["diverged"].sum() else []) + (
            ["stop_epoch"] if halving else []) + [
            c for c in ("val_auc_mean", "val_auc_std", "val_video_auc_mean", "val_loss_mean", "val_eer_mean",
                        "holdout_auc_mean")
            if c in board.columns]
        with pl.Config(tbl_rows=50, float_precision=4, tbl_width_chars=160):
            out.print(_full_floats(board.select(show), settings))
        out.print(f"leaderboard: {out_dir / 'leaderboard.parquet'}   best run: {out_dir / 'best'}")


if __name__ == "__main__":  # python cli.py ... runs dfembed
    dfembed_main()
