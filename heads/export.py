"""One-file detectors: a run folder as one safetensors file (`dfhead export RUN OUT.dfclip`).

The file holds the head's tensors and, in the safetensors header's string metadata:
    "format": EXPORT_FORMAT
    "config": the run's config.json as JSON text: settings (head kind and sizes, feature, l2
              normalisation, video pooling), the head, the threshold, the calibration and the
              store provenance (backbone library, name, weights and their sha256, preprocessing,
              blocks, tap, face and video settings), from which embed.config.config_from_provenance
              rebuilds the embedding exactly.
safetensors holds no code (no pickle), so loading a file from elsewhere runs nothing of it.

`load_run` and `load_run_config` (heads.report) read such a file wherever they take a run
folder, so `dfhead predict OUT.dfclip IMAGES`, `--store` and `dfhead eval` work on it unchanged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dfclip.errors import UserError

EXPORT_FORMAT = "dfclip-detector/1"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write run `run_dir` as the one file `out` (written aside, then renamed into place); returns its path."""
    from safetensors.torch import save_file

    from dfclip.heads.report import check_writable_file, load_run

    check_writable_file(out, "OUT")
    head, config = load_run(run_dir)
    state = {n: t.detach().cpu().contiguous() for n, t in head.state_dict().items()}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT, "config": json.dumps(config, default=str)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_export(path: str | os.PathLike) -> tuple[dict, dict]:
    """(config, tensors) of an exported detector, the config checked as a run's config.json is.

    UserError (one line) when the file is not a safetensors file, is not a dfclip export, or its
    config is damaged or does not fit its tensors.
    """
    from safetensors import safe_open

    from dfclip.heads.report import config_problems

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()} if meta.get("format") == EXPORT_FORMAT else None
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a foreign file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a dfclip export (not a safetensors file: {why}); "
                        "write one with `dfhead export RUN OUT.dfclip`") from None
    if tensors is None:
        raise UserError(f"{path} is not a dfclip export (its header has format {meta.get('format')!r}, "
                        f"not {EXPORT_FORMAT!r}); write one with `dfhead export RUN OUT.dfclip`")
    try:
        config = json.loads(meta.get("config", ""))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its config cannot be read as JSON ({e}); export the run again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: its config must be a JSON object; export the run again")
    stored = sum(math.prod(t.shape) for t in tensors.values())
    problems = config_problems(config, stored, f"{path.name}'s tensors")
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    return config, tensors


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` names a file (an export, or a mistake) rather than a run folder."""
    return Path(path).is_file()
