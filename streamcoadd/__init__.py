"""streamcoadd: streaming, crash-safe cell-based coadds with persistent HDF5 accumulators."""

from streamcoadd.core.skymap import Box, CellId, PatchId, load_skymap
from streamcoadd.core.version import __version__

__all__ = ["__version__", "open_state", "State", "TractView", "PatchView", "CellView",
           "load_skymap", "Box", "CellId", "PatchId"]

_READER = ("open_state", "State", "TractView", "PatchView", "CellView")


def __getattr__(name: str):
    # The reader API (astropy.table, finalize) is imported on first use, so that the CLI's
    # writers (ingest, watch) start without it: ~0.25 s less per command.
    if name in _READER:
        from streamcoadd.analysis import reader
        return getattr(reader, name)
    raise AttributeError(f"module 'streamcoadd' has no attribute {name!r}")
