"""dfclip: robust AI-generated face detection on cached CLIP embeddings.

The repository root is the `dfclip` package (pyproject maps it), so its folders are
`dfclip.embed` (images -> features), `dfclip.store` (the on-disk format) and
`dfclip.heads` (losses, models, training, metrics); `dfclip.cli` is the command line.

    from dfclip import store                            # store.open(dir).load()
    from dfclip.embed import EmbedConfig, extract       # images -> a store
    from dfclip.heads.config import RunConfig, make_config
    from dfclip.heads.run import fit, sweep, grid, evaluate_run, predict_store
    from dfclip.pipeline import predict_images          # images -> scores with a trained run
    from dfclip import Detector                         # Detector.load("run.dfclip")(images) -> scores
"""

__version__ = "0.2.0"
__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    """`dfclip.Detector`, imported on first use: `import dfclip` stays free of polars and torch."""
    if name == "Detector":
        from dfclip.detector import Detector

        return Detector
    raise AttributeError(f"module 'dfclip' has no attribute {name!r}")
