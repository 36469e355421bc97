"""A validated warp as values: its identity (:class:`WarpId`), PSF model (:class:`PsfModel`)
and planes (:class:`Warp`); made by ``streamcoadd.io.warp_reader``, used by the fold."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box

NO_DATA = 1 << CANONICAL_PLANES["NO_DATA"]


# A warp's scalar weight (1/nJy^2) must lie in this range: outside it w^2 * var over- or
# underflows float64 in the sums (an absurd WEIGHT header, or a variance plane in the
# wrong units), which would leave non-finite accumulators in the state.
WEIGHT_RANGE = (1e-30, 1e30)


@dataclass(frozen=True)
class WarpId:
    """What makes a warp unique in a state: one (visit, detector) on one tract."""

    tract: int
    visit: int
    detector: int

    def __str__(self) -> str:
        return f"visit {self.visit} detector {self.detector} (tract {self.tract})"


@dataclass
class PsfModel:
    """PSF stamps on the tract pixel grid.

    ``stamps``: (n, h, w) float64, odd h and w, centred. ``positions``: (n, 2) tract pixel
    (x, y) where each applies, or ``None`` for a single stamp valid everywhere.
    """

    stamps: np.ndarray
    positions: np.ndarray | None

    def index_at(self, x: float, y: float) -> int:
        """Index of the stamp nearest to tract pixel (x, y) (the grid is not interpolated)."""
        if self.positions is None:
            return 0
        d2 = (self.positions[:, 0] - x) ** 2 + (self.positions[:, 1] - y) ** 2
        return int(np.argmin(d2))

    def at(self, x: float, y: float) -> np.ndarray:
        return self.stamps[self.index_at(x, y)]


@dataclass
class Warp:
    """One validated warp. Arrays have shape (H, W); pixel [0, 0] is tract pixel ``xy0``."""

    path: str
    content_hash: str  # sha256 of the file bytes
    id: WarpId
    band: str
    xy0: tuple[int, int]
    image: np.ndarray  # float32, nJy
    mask: np.ndarray  # int32, canonical bits
    variance: np.ndarray  # float32, nJy^2
    psf: PsfModel
    noise: list[np.ndarray]  # float32 noise realizations, same shape as image
    weight_override: float | None = None
    instrument: str = ""
    physical_filter: str = ""
    mjd: float = float("nan")
    unknown_planes: tuple[str, ...] = ()

    @property
    def box(self) -> Box:
        h, w = self.mask.shape  # (image and variance may be released after preparing)
        return Box(self.xy0[0], self.xy0[1], self.xy0[0] + w, self.xy0[1] + h)


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
