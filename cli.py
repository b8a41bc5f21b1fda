"""Command-line entry points `dfembed` and `dfhead`: parse options, call one library function, print.

No logic lives here. Every mistake a user can make surfaces as store.errors.UserError, printed
as one line with a non-zero exit. Heavy imports (torch, open_clip) stay inside the commands so
`--help` and `dfembed info` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from store.errors import UserError

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


def _main(app: typer.Typer) -> None:
    try:
        app()
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: completed shards are kept; re-run the same command to resume")
        sys.exit(130)


def dfembed_main() -> None:
    _main(embed_app)


def dfhead_main() -> None:
    _main(head_app)


# ---------------------------------------------------------------- dfembed

@embed_app.command()
def info(
    store_dir: Annotated[Path, typer.Argument(help="Store directory.")] = DEFAULT_STORE,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Rows, dim, model, per-label and per-source counts, failures and size on disk of a store."""
    import store

    s = store.open(store_dir)
    rep = s.info()
    if as_json:
        out.print_json(json.dumps(rep))
        return
    from rich.table import Table

    t = Table(title=f"store {rep['store']}", show_header=False)
    for k in ("rows", "dim", "dtype", "model", "pretrained", "feature", "shards", "failures"):
        t.add_row(k, str(rep[k]))
    t.add_row("labels", ", ".join(f"{ {'1': 'fake', '0': 'real', '-1': 'unknown'}[k]}={v}" for k, v in rep["labels"].items()))
    t.add_row("sources", ", ".join(f"{k or '(none)'}={v}" for k, v in rep["sources"].items()))
    t.add_row("size on disk", f"{rep['bytes_on_disk'] / 2**20:.1f} MiB")
    out.print(t)


@embed_app.command("import-h5")
def import_h5(
    h5_file: Annotated[Path, typer.Argument(help="HDF5 file holding an N x D feature dataset (e.g. cup_train.h5).")],
    csv: Annotated[Path, typer.Option(help="Labels CSV whose rows are in the dataset's order.")],
    dataset: Annotated[str, typer.Option(help="Dataset name inside the .h5 (SP_CUP: train_features / test_features).")] = "train_features",
    out_dir: Annotated[Path, typer.Option("--out", help="Store directory to write.")] = DEFAULT_STORE,
    column: Annotated[Optional[list[str]], typer.Option(help="OURS=THEIRS, e.g. 'path=Image Path', 'label=Target', 'source=Gen'.")] = None,
    target_means: Annotated[str, typer.Option(help="What Target 1 means: fake (SP_CUP) or real.")] = "fake",
    split: Annotated[str, typer.Option(help="Split of every row when no split column is mapped, e.g. train / val.")] = "",
    model: Annotated[str, typer.Option(help="Model that made the features (recorded as declared).")] = "ViT-L-14",
    pretrained: Annotated[str, typer.Option(help="Its weights (recorded as declared).")] = "openai",
    feature: Annotated[str, typer.Option(help="proj (CLIP embedding) or pre (before the projection).")] = "proj",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 or float32.")] = "float16",
) -> None:
    """Import features you already extracted (SP_CUP-style .h5 + labels CSV) into a store."""
    from embed.sources import parse_column_map
    from store.importer import import_h5 as run_import

    rep = run_import(h5_file, csv, dataset=dataset, out=out_dir, columns=parse_column_map(column or []),
                     target_means=target_means, split=split, model=model, pretrained=pretrained, feature=feature,
                     dtype=dtype)
    labels = rep["labels"]
    out.print(f"imported {rep['rows']} rows (fake={labels['1']}, real={labels['0']}, unknown={labels['-1']}) "
              f"of dim {rep['dim']} into {rep['store']} ({rep['shards']} shards)", highlight=False)
    if rep["duplicate_paths"]:
        console.print(f"[yellow]note[/]: {rep['duplicate_paths']} paths appear more than once; the last row of each is kept")


# ---------------------------------------------------------------- dfhead


if __name__ == "__main__":  # python cli.py ... runs dfembed
    dfembed_main()
