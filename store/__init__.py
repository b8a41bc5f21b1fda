"""The on-disk store of embeddings: immutable HDF5 shards plus Parquet side files.

    from dfclip import store
    s = store.open("embeddings")
    X, meta = s.load(label=[0, 1])        # one preallocated array + a polars frame
    f = store.fuse(["st_clip", "st_dino"])  # stores of the same images joined by path (store.fused)

Nothing outside this package writes or parses shards. See docs/store-format.md.
"""

from dfclip.errors import UserError
from dfclip.store.format import FORMAT_VERSION
from dfclip.store.reader import Store, list_shards, open
from dfclip.store.fused import FusedStore, fuse, is_view
from dfclip.store.writer import ReadOnlyStore, ShardWriter, writer_lock

__all__ = ["FORMAT_VERSION", "FusedStore", "ReadOnlyStore", "ShardWriter", "Store", "UserError", "fuse", "is_view",
           "list_shards", "open", "writer_lock"]
