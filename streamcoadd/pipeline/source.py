"""The one source of prepared, routed warps: read → hash → validate → prepare → route.

Every executor gets its warps here: the local loader (:mod:`streamcoadd.pipeline.loader`,
one warp ahead on a second core), the Dask workers (:mod:`streamcoadd.pipeline.dask_executor`)
and retraction (which passes the hash it expects and the weight stored at fold time).
Nothing here touches the state.

The Dask coordinator routes a warp before any worker reads it, from its headers only
(:func:`probe_warp`, :func:`contributing_patches`); the workers then prepare it and
route it exactly (:func:`route`, the overlap rule) to the shards they hold.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from astropy.io import fits

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import (
    CellInput,
    PreparedWarp,
    good_variances,
    prepare_warp,
    shard_inputs,
    use_reference,
    weight_from_variances,
)
from streamcoadd.core.skymap import Box, PatchId, SkyMap, Tract
from streamcoadd.core.warp import WarpId, file_hash
from streamcoadd.io.warp_reader import (
    gunzip,
    int_key,
    pixel_origin,
    read_and_hash,
    read_bytes,
    read_warp,
)

#: (inode, size, mtime in ns) of a file: a later change of the file shows as a mismatch
FileSignature = tuple[int, int, int]


class WarpChanged(WarpRejected):
    """The file's content is not the one expected (it was replaced since it was hashed)."""

    def __init__(self, path):
        super().__init__(path, "the file changed while it was being ingested (its content "
                               "hash differs); deliver it again")


@dataclass(frozen=True)
class RoutedWarp:
    """One warp file read, hashed, validated, prepared and routed.

    Exactly one of ``prepared`` and ``rejection`` is set.

    Attributes
    ----------
    path : str
    content_hash : str
        SHA-256 of the file's bytes as delivered (hex).
    prepared : PreparedWarp or None
        Weight, interpolated planes and mask planes (warp-shaped arrays).
    inputs : dict of PatchId to list of CellInput
        Per patch, the cells the warp contributes to (overlap rule applied).
    rejection : WarpRejected or None
        Why it cannot be folded (a :class:`WarpChanged` if the hash is not the expected one).
    signature : FileSignature or None
        The file's signature before it was read (None if it could not be stat'ed).
    """

    path: str
    content_hash: str
    prepared: PreparedWarp | None = None
    inputs: dict[PatchId, list[CellInput]] = field(default_factory=dict)
    rejection: WarpRejected | None = None
    signature: FileSignature | None = None


def file_signature(path: str) -> FileSignature | None:
    """(inode, size, mtime ns) of ``path``, None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def route(prepared: PreparedWarp, skymap: SkyMap, fold: FoldConfig,
          patches: Iterable[PatchId] | None = None) -> dict[PatchId, list[CellInput]]:
    """The cells a prepared warp contributes to, per patch (the overlap rule).

    Parameters
    ----------
    patches : iterable of PatchId, optional
        Only these patches (a Dask task's shards; retraction's shards holding the warp).
        Default: every patch whose outer box the warp's pixel box overlaps.
    """
    tract = skymap.tract(prepared.warp.id.tract)
    if patches is None:
        patches = tract.patches_overlapping(prepared.box)
    return {patch: shard_inputs(prepared, tract, patch, fold) for patch in patches}


# Long because half of it is the numpydoc docstring; the body is the one read-to-route path.
def load_warp(path: str, skymap: SkyMap, fold: FoldConfig, *,
              expect_hash: str | None = None, weight: float | None = None,
              patches: Iterable[PatchId] | None = None,
              aux: ThreadPoolExecutor | None = None) -> RoutedWarp:
    """Read, hash, validate, prepare and route one warp file.

    Parameters
    ----------
    path : str
    skymap, fold
        The state's sky map and fold configuration.
    expect_hash : str, optional
        The SHA-256 the file must have (a Dask worker, retraction); else a
        :class:`WarpChanged` rejection, and nothing is parsed.
    weight : float, optional
        Use this weight (1/nJy^2; retraction: the weight stored at fold time) instead of
        the header ``WEIGHT`` or the clipped-mean one.
    patches : iterable of PatchId, optional
        Route to these patches only (see :func:`route`); ``()``: do not route.
    aux : ThreadPoolExecutor, optional
        A one-thread pool: the clipped-mean weight (on its own copy of the good
        variances) runs there while the bad pixels are interpolated (and, with the
        reference reader, ``STREAMCOADD_REFERENCE=read``, the SHA-256 while the file is
        parsed; by default the file is hashed while it is read).

    Returns
    -------
    RoutedWarp
        Rejections (invalid file, changed content) are returned, not raised.

    Raises
    ------
    WarpRejected
        Only if the file cannot be read at all.
    """
    signature = file_signature(path)  # before reading: a later change shows as a mismatch
    raw = not use_reference("read")
    if raw:  # hashed while read; the planes are then views of the buffer, swapped in place
        data, h = read_and_hash(path)
        hashing = None
    else:  # the reference path: the bytes, hashed on ``aux`` while astropy parses a copy
        data = read_bytes(path)
        hashing = aux.submit(file_hash, data) if aux is not None and expect_hash is None \
            else None
        h = None if hashing else file_hash(data)
    if expect_hash is not None and h != expect_hash:
        return RoutedWarp(path, h, rejection=WarpChanged(path), signature=signature)
    try:
        warp = read_warp(path, skymap, fold.bad_planes, fold.noise_realizations, data=data,
                         content_hash=h or "", raw=raw)
    except WarpRejected as e:
        return RoutedWarp(path, h or hashing.result(), rejection=e, signature=signature)
    if hashing is not None:
        h = warp.content_hash = hashing.result()
    del data  # (raw: the planes keep the buffer alive until they are dropped)
    try:
        prepared = _prepare(warp, fold, weight, aux)
        inputs = route(prepared, skymap, fold, patches)
    except WarpRejected as e:
        return RoutedWarp(path, h, rejection=e, signature=signature)
    return RoutedWarp(path, h, prepared=prepared, inputs=inputs, signature=signature)


def _prepare(warp, fold: FoldConfig, weight: float | None,
             aux: ThreadPoolExecutor | None) -> PreparedWarp:
    """prepare_warp, consuming the warp's arrays, with the weight computed on ``aux``."""
    weighing = None
    given = weight is not None  # the stored weight of a warp already folded (retraction)
    if weight is None:
        weight = warp.weight_override
    if weight is None:
        var = good_variances(warp, fold)  # a copy: interpolation may proceed meanwhile
        if aux is not None:
            weighing = aux.submit(weight_from_variances, var, warp.path)
        else:
            weight = weight_from_variances(var, warp.path)
        del var
    prepared = prepare_warp(warp, fold, consume=True, weight=float("nan"),
                            check_weight=not given)
    prepared.weight = weighing.result() if weighing is not None else weight
    return prepared


# ------------------------------------------------------------------ routing by headers

@dataclass(frozen=True)
class WarpProbe:
    """A warp's identity, band and pixel box (tract pixels, end-exclusive), from headers."""

    warp_id: WarpId
    band: str
    box: Box


def probe_warp(path: str, data: bytes, skymap: SkyMap, fold: FoldConfig) -> WarpProbe:
    """Identity, band and pixel box from the primary and IMAGE headers of the file's
    ``data`` (cheap: no pixel is decoded). Anything odd falls back to the full reader,
    whose rejection message is the reference one (raises :class:`WarpRejected`)."""
    try:
        raw = gunzip(path, data) if data[:2] == b"\x1f\x8b" else data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=True) as hdul:
                ph, ih = hdul[0].header, hdul["IMAGE"].header
                wid = WarpId(int_key(path, ph, "TRACT"), int_key(path, ph, "VISIT"),
                             int_key(path, ph, "DETECTOR"))
                band = ph["BAND"].strip()
                if not band or len(band) > 32 or \
                        not band.replace("_", "").replace("-", "").isalnum():
                    raise ValueError("band")
                skymap.tract(wid.tract)
                if ih["NAXIS"] != 2:
                    raise ValueError("naxis")
                x0, y0 = pixel_origin(path, ih)
                return WarpProbe(wid, band, Box(x0, y0, x0 + int(ih["NAXIS1"]),
                                                y0 + int(ih["NAXIS2"])))
    except Exception:  # noqa: BLE001 - the full reader says precisely what is wrong
        warp = read_warp(path, skymap, fold.bad_planes, fold.noise_realizations, data=data)
        return WarpProbe(warp.id, warp.band, warp.box)


def contributing_patches(tract: Tract, box: Box, fold: FoldConfig) -> list[PatchId]:
    """Patches with at least one cell a warp with pixel box ``box`` *could* contribute to:
    the cell centre inside the box and enough of the inner box covered (the overlap
    rule's necessary geometric conditions; whether the pixels there are valid is seen
    once the warp is prepared). A warp overlaps more patch *outer* boxes than it can feed;
    skipping the others saves reading it where nothing would be folded."""
    out = []
    for patch in tract.patches_overlapping(box):
        for cell in tract.cells_overlapping(patch, box):
            cx, cy = tract.cell_centre(cell)
            if not (box.x0 <= cx < box.x1 and box.y0 <= cy < box.y1):
                continue
            inner = tract.cell_inner_box(cell)
            part = inner.intersection(box)
            # same form as cell_input's test, with covered pixels <= part's area
            if not part.empty and (part.width * part.height) / (inner.width * inner.height) \
                    >= fold.min_overlap_fraction:
                out.append(patch)
                break
    return out
