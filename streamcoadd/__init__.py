"""streamcoadd: streaming, crash-safe cell-based coadds with persistent HDF5 accumulators."""

from .reader import CellView, PatchView, State, TractView, open_state
from .skymap import Box, CellId, PatchId, load_skymap

__all__ = ["open_state", "State", "TractView", "PatchView", "CellView", "load_skymap", "Box",
           "CellId", "PatchId"]
__version__ = "0.1.0"
