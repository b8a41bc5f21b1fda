"""dfclip: robust AI-generated face detection on cached CLIP embeddings.

The repository root is the `dfclip` package (pyproject maps it), so its folders are
`dfclip.embed` (images -> features), `dfclip.store` (the on-disk format) and
`dfclip.heads` (losses, models, training, metrics); `dfclip.cli` is the command line.

    from dfclip import store
    from dfclip.heads import RunConfig, fit, sweep, grid
    from dfclip.embed import EmbedConfig, extract
"""

__version__ = "0.2.0"
