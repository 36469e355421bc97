"""Read and validate warp FITS files (SPEC §2).

:func:`read_warp` returns a :class:`Warp` with arrays in native byte order and the mask in
canonical bits, or raises :class:`~streamcoadd.core.errors.WarpRejected` naming the file and the
problem.  Reading has no side effects: it never touches a state.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

from streamcoadd.core.errors import UserError, WarpRejected
from streamcoadd.core.masks import bitmask, planes_from_header, remap_to_canonical
from streamcoadd.core.skymap import Box, SkyMap
from streamcoadd.core.warp import (
    NO_DATA,
    WEIGHT_RANGE,
    PsfModel,
    Warp,
    WarpId,
    file_hash,
)

MAX_WARP_BYTES = 8 * 2**30  # refuse absurd files before reading them
WCS_TOLERANCE_PX = 1e-3


log = logging.getLogger("streamcoadd.warp_reader")

# PSF stamp sums are accepted within 1 +- 0.1 and warned about beyond 1 +- PSF_SUM_WARN
PSF_SUM_WARN = 0.005


def read_warp(path: str | Path, skymap: SkyMap, bad_planes=(), noise_realizations: int = 0,
              data: bytes | np.ndarray | None = None, content_hash: str | None = None,
              raw: bool = True) -> Warp:
    """Read and validate one warp file.

    ``bad_planes`` are the planes that will be interpolated; values under them are not
    required to be finite. ``noise_realizations`` NOISEk HDUs are required and read.
    ``data`` may pass the file bytes already read (``bytes``, or the writeable uint8
    array of :func:`read_and_hash`), ``content_hash`` their SHA-256 (:func:`file_hash`
    of the bytes as stored, before any gunzip).

    With ``raw`` (the default) the large image planes are read straight from ``data``
    (:func:`open_raw`: views of a writeable buffer, byte-swapped in place; astropy still
    parses every header), falling back to astropy's ``fits.open`` for any file that is
    not plain; ``raw=False`` always uses ``fits.open``. Both give the same Warp.
    """
    path = str(path)
    if data is None:
        data = read_bytes(path)
    if content_hash is None:
        content_hash = file_hash(data)
    if len(data) == 0:
        raise WarpRejected(path, "the file is empty")
    if bytes(data[:2]) == b"\x1f\x8b":
        data = gunzip(path, data)
    if bytes(data[:9]) != b"SIMPLE  =":
        raise WarpRejected(path, "not a FITS file (it does not start with 'SIMPLE  =')")
    _check_declared_sizes(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyWarning)
            hdul = open_raw(data) if raw else None
            if hdul is not None:
                return _parse(path, content_hash, hdul, skymap, bad_planes, noise_realizations)
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False) as hdul:
                return _parse(path, content_hash, hdul, skymap, bad_planes, noise_realizations)
    except WarpRejected:
        raise
    except UserError as e:
        raise WarpRejected(path, str(e)) from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            AstropyWarning, fits.VerifyError, MemoryError, OverflowError,
            AssertionError) as e:  # (astropy asserts on some bad table keywords)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg:
            raise WarpRejected(path, f"the file is truncated ({msg[:200]}); deliver it again "
                                     "complete (write to NAME.tmp, then rename)") from None
        raise WarpRejected(path, f"not a readable warp FITS file ({msg[:300]})") from None


MAX_TFIELDS = 999  # the FITS standard's limit
MAX_NAXIS = 3  # a warp's HDUs are 2-D images, a 3-D PSF cube, or a (2-D) table


# Long because one walk over a possibly hostile file's headers before astropy allocates
# anything.
def _check_declared_sizes(path: str, data: bytes) -> None:
    """Walk the HDU headers and refuse absurd dimensions before astropy sees them: astropy
    loops over ``range(NAXIS)`` (NAXIS = 10**9 in a tiny file would run for hours and eat
    memory) and trusts NAXISn. Anything this simple parser does not understand is left
    to astropy, which rejects it."""
    mv = memoryview(data).cast("B")  # (bytes or a uint8 array)
    pos, n = 0, len(mv)
    while pos < n:
        axes, bitpix, pcount, gcount = {}, None, 0, 1
        end = None
        for off in range(pos, min(n - 79, pos + 2880 * 100), 80):
            card = bytes(mv[off:off + 80])
            key = card[:8].rstrip()
            if key == b"END":
                end = off + 80
                break
            if card[8:10] != b"= ":
                continue
            value = card[10:80].split(b"/")[0].strip()
            if key.startswith(b"NAXIS") or key in (b"BITPIX", b"PCOUNT", b"GCOUNT",
                                                   b"TFIELDS"):
                try:
                    v = int(value)
                except ValueError:
                    try:  # astropy may still take '1E9' or '1.0E9' as a number
                        v = float(value.replace(b"D", b"E"))
                        if not np.isfinite(v) or v != int(v):
                            raise ValueError
                        v = int(v)
                    except ValueError:
                        if key == b"NAXIS":
                            raise WarpRejected(path, f"header NAXIS = {value[:20]!r} is not "
                                                     "an integer") from None
                        continue  # astropy reports it
                if key == b"NAXIS":
                    if not 0 <= v <= MAX_NAXIS:
                        raise WarpRejected(path, f"header declares NAXIS = {v}; a warp HDU "
                                                 f"has at most {MAX_NAXIS} axes")
                elif key == b"TFIELDS":
                    # astropy builds every column up front (TFIELDS = 2**31: tens of GB)
                    if not 0 <= v <= MAX_TFIELDS:
                        raise WarpRejected(path, f"header declares TFIELDS = {v}; a FITS "
                                                 f"table has at most {MAX_TFIELDS} columns")
                elif key == b"BITPIX":
                    bitpix = v
                elif key == b"PCOUNT":
                    pcount = v
                elif key == b"GCOUNT":
                    gcount = v
                else:
                    axes[key] = v
        if end is None:
            return  # no END card: astropy reports the broken header
        dims = list(axes.values())
        if any(v < 0 for v in dims) or pcount < 0 or gcount < 0:
            raise WarpRejected(path, f"header declares a negative size {sorted(axes.items())}")
        size = 0
        if dims and bitpix is not None:
            size = abs(bitpix) // 8 * gcount * (pcount + int(np.prod(dims, dtype=object)))
        start = -(-end // 2880) * 2880  # the header is padded to a 2880-byte block
        if start + size > n:
            raise WarpRejected(path, f"an HDU declares {size} bytes of data "
                                     f"({' x '.join(str(v) for v in dims)}) but the file has "
                                     f"only {max(0, n - start)} bytes left: truncated or corrupt")
        pos = start + -(-size // 2880) * 2880


@contextmanager
def _reading(path: str):
    """The one-line rejections for a file that cannot be read (raised as WarpRejected)."""
    try:
        yield
    except FileNotFoundError:
        raise WarpRejected(path, "the file disappeared before it could be read") from None
    except PermissionError:
        raise WarpRejected(path, "permission denied reading the file; fix its permissions "
                                 "and deliver it again") from None
    except IsADirectoryError:
        raise WarpRejected(path, "is a directory, not a warp file") from None
    except OSError as e:
        raise WarpRejected(path, f"cannot read the file: {e.strerror or e}") from None


def _check_size(path: str) -> int:
    size = os.path.getsize(path)
    if size > MAX_WARP_BYTES:
        raise WarpRejected(path, f"file is {size / 2**30:.1f} GiB, larger than the "
                                 f"{MAX_WARP_BYTES / 2**30:.0f} GiB limit for one warp")
    return size


def read_bytes(path: str) -> bytes:
    """The file's bytes (raises :class:`WarpRejected` if it cannot be read)."""
    with _reading(path):
        _check_size(path)
        with open(path, "rb") as f:
            return f.read()


READ_CHUNK = 1 << 20  # bytes hashed while still in cache


def read_and_hash(path: str) -> tuple[np.ndarray, str]:
    """The file's bytes and their SHA-256, hashed chunk by chunk as they are read.

    Returns
    -------
    data : numpy.ndarray
        uint8, 1-D, writeable (so that :func:`read_warp` can byte-swap the image planes
        in place, as views of it), not zero-filled first.
    content_hash : str
        SHA-256 (hex) of exactly the bytes returned, as :func:`file_hash` of them.

    Raises
    ------
    WarpRejected
        As :func:`read_bytes`.
    """
    with _reading(path):
        size = _check_size(path)
        buf = np.empty(size, np.uint8)
        mv = memoryview(buf)
        h = hashlib.sha256()
        got = 0
        with open(path, "rb", buffering=0) as f:
            while got < size:
                k = f.readinto(mv[got:got + READ_CHUNK])
                if not k:
                    break
                h.update(mv[got:got + k])
                got += k
            rest = f.read()  # the file grew meanwhile: keep and hash it all, as f.read()
        if got < size:  # it shrank meanwhile
            buf = buf[:got]
        if rest:
            h.update(rest)
            buf = np.concatenate([buf, np.frombuffer(rest, np.uint8)])
        return buf, h.hexdigest()


class RawHDU:
    """One HDU of :func:`open_raw`: an astropy ``header``, its ``data`` and ``name`` (as
    astropy's ``hdu.name``: the EXTNAME value as a string)."""

    def __init__(self, name: str, header: fits.Header, data):
        self.name, self.header, self.data = name, header, data


class RawHDUList(list):
    """What :func:`_parse` uses of ``fits.HDUList``, with its semantics: index, slice,
    lookup by EXTNAME (case-insensitive, first match; "PRIMARY" is always the first
    HDU) and ``name in hdul``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            k = key.strip().upper()
            for i, h in enumerate(self):
                if h.name.strip().upper() == k or (k == "PRIMARY" and i == 0):
                    return h
            raise KeyError(f"Extension {key!r} not found.")
        return list.__getitem__(self, key)

    def __contains__(self, key):
        if isinstance(key, str):
            try:
                self[key]
            except KeyError:
                return False
            return True
        return list.__contains__(self, key)


RAW_MIN_BYTES = 1 << 20  # image HDUs from this size on are views of the buffer
_PRINTABLE = bytes(range(32, 127))
RAW_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def open_raw(data) -> RawHDUList | None:
    """Parse a FITS file held in memory without copying its large image planes.

    Each header is parsed by astropy (``Header.fromstring``); the data of a large plain
    image HDU (standard BITPIX, no BSCALE/BZERO/BLANK) is ``np.frombuffer`` at its offset
    (writeable when ``data`` is: :func:`_native` then byte-swaps it in place); small HDUs
    (primary, PSF cube, tables) go through astropy's own HDU parser. ``data`` is not
    modified here.

    Returns None for anything unusual, and the caller parses the file with ``fits.open``
    (whose error message is then the reference one): any parse error or warning, a
    header without END within 100 blocks, a first card that is not SIMPLE = T /
    XTENSION, groups, heaps (PCOUNT != 0), GCOUNT != 1, non-integer sizes, or bytes
    after the last HDU.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return _open_raw(memoryview(data).cast("B"))
    except Exception:  # noqa: BLE001 - fits.open then reports it in its own words
        return None


def _open_raw(mv: memoryview) -> RawHDUList | None:
    n = len(mv)
    out = RawHDUList()
    pos = 0
    while pos < n:
        end = _header_end(mv, pos)
        if end is None:
            return None
        if bytes(mv[pos:-(-end // 2880) * 2880]).translate(None, _PRINTABLE):
            return None  # non-printable bytes (padding too): fits.open warns, replaces them
        header = fits.Header.fromstring(bytes(mv[pos:end]))
        for card in header.cards:  # every value parses (fits.open may touch any of them)
            card.value  # noqa: B018
        if "ZIMAGE" in header:
            return None  # a tile-compressed image: astropy decompresses it
        first = next(iter(header.keys()), "")
        if first not in ("SIMPLE", "XTENSION") or (first == "SIMPLE") != (pos == 0) \
                or (pos == 0 and header["SIMPLE"] is not True):
            return None
        size = _plain_data_size(header)
        if size is None:
            return None
        start = -(-end // 2880) * 2880
        stop = start + -(-size // 2880) * 2880
        if stop > n:
            return None  # (_check_declared_sizes has rejected a truncated file already)
        bitpix = header["BITPIX"]
        if (pos and header["XTENSION"] == "IMAGE" and header["NAXIS"] >= 1
                and size >= RAW_MIN_BYTES
                and not any(k in header for k in ("BSCALE", "BZERO", "BLANK"))):
            dims = [header[f"NAXIS{k}"] for k in range(header["NAXIS"], 0, -1)]
            arr = np.frombuffer(mv, dtype=RAW_DTYPES[bitpix],
                                count=size // (abs(bitpix) // 8), offset=start)
            out.append(RawHDU(str(header.get("EXTNAME", "")), header, arr.reshape(dims)))
        else:
            hdu = fits.HDUList.fromstring(bytes(mv[pos:stop]))[0]  # astropy's own parser
            hdu_data = hdu.data  # (parsed now: the HDU holds its own copy)
            out.append(RawHDU(hdu.name, hdu.header, hdu_data))
        pos = stop
    return out if pos == n else None


def _header_end(mv: memoryview, pos: int) -> int | None:
    """Offset just past the END card of the header starting at ``pos`` (None: none in
    the next 100 blocks)."""
    n = len(mv)
    for off in range(pos, min(n - 79, pos + 2880 * 100), 2880):
        blk = bytes(mv[off:off + 2880])
        for i in range(0, len(blk), 80):
            if blk[i:i + 8] == b"END     ":
                return off + i + 80
    return None


def _plain_data_size(header: fits.Header) -> int | None:
    """Data bytes of a plain HDU (no groups, no heap), None for anything else."""
    naxis, bitpix = header.get("NAXIS", 0), header.get("BITPIX")
    if type(naxis) is not int or type(bitpix) is not int or bitpix not in RAW_DTYPES \
            or header.get("PCOUNT", 0) != 0 or header.get("GCOUNT", 1) != 1 \
            or header.get("GROUPS", False):
        return None
    dims = [header.get(f"NAXIS{k}") for k in range(1, naxis + 1)]
    if any(type(d) is not int or d < 0 for d in dims):
        return None
    return abs(bitpix) // 8 * int(np.prod(dims, dtype=np.int64)) if naxis else 0


def gunzip(path, data: bytes) -> bytes:
    """Decompress a gzipped warp (``.fits.gz``), refusing absurd expansion."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_WARP_BYTES)
    except zlib.error as e:
        raise WarpRejected(path, f"gzip data is corrupt ({e})") from None
    if d.unconsumed_tail:
        raise WarpRejected(path, f"gzip expands beyond the {MAX_WARP_BYTES / 2**30:.0f} GiB "
                                 "limit for one warp")
    if not d.eof:
        raise WarpRejected(path, "gzip data is truncated")
    return out


def _hdu(path, hdul, name):
    try:
        hdu = hdul[name]
    except KeyError:
        present = ", ".join(h.name for h in hdul[1:]) or "none"
        raise WarpRejected(path, f"missing HDU {name!r} (extensions present: {present})") from None
    if getattr(hdu, "data", None) is None:  # an HDU astropy cannot classify has no .data
        raise WarpRejected(path, f"HDU {name!r} holds no data (or is not a valid image HDU)")
    return hdu


def int_key(path, header, key, where="primary header"):
    if key not in header:
        raise WarpRejected(path, f"{where} lacks required keyword {key}")
    v = header[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise WarpRejected(path, f"{where} keyword {key} must be an integer, got {v!r}")
    if not 0 <= int(v) < 2**62:
        raise WarpRejected(path, f"{where} keyword {key} = {v} is out of range")
    return int(v)


# Long because the SPEC section 2 validation list, one check and one message after the
# other.
def _parse(path, content_hash, hdul, skymap, bad_planes, noise_realizations) -> Warp:
    ph = hdul[0].header
    visit = int_key(path, ph, "VISIT")
    detector = int_key(path, ph, "DETECTOR")
    tract_id = int_key(path, ph, "TRACT")
    band = ph.get("BAND")
    if not isinstance(band, str) or not band.strip() or len(band) > 32 \
            or not band.strip().replace("_", "").replace("-", "").isalnum():
        raise WarpRejected(path, f"primary header BAND must be a short name like 'r', got {band!r}")
    band = band.strip()
    weight = ph.get("WEIGHT")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not np.isfinite(weight) or weight <= 0:
            raise WarpRejected(path, f"header WEIGHT must be a positive finite number, got {weight!r}")
        if not WEIGHT_RANGE[0] <= weight <= WEIGHT_RANGE[1]:
            raise WarpRejected(path, f"header WEIGHT = {weight!r} is outside the sane range "
                                     f"{WEIGHT_RANGE[0]:g}..{WEIGHT_RANGE[1]:g} (1/nJy^2)")
        weight = float(weight)
    tract = skymap.tract(tract_id)

    img_hdu = _hdu(path, hdul, "IMAGE")
    msk_hdu = _hdu(path, hdul, "MASK")
    var_hdu = _hdu(path, hdul, "VARIANCE")
    ih = img_hdu.header
    bunit = str(ih.get("BUNIT", "")).strip()
    if bunit != "nJy":
        raise WarpRejected(path, f"IMAGE BUNIT is {bunit or 'missing'!r}; warps must be "
                                 "calibrated to 'nJy'")
    image, mask_raw, variance = img_hdu.data, msk_hdu.data, var_hdu.data
    if image.ndim != 2:
        raise WarpRejected(path, f"IMAGE must be 2-D, it has shape {image.shape}")
    for name, arr in (("MASK", mask_raw), ("VARIANCE", variance)):
        if arr.shape != image.shape:
            raise WarpRejected(path, f"{name} shape {arr.shape} differs from IMAGE shape {image.shape}")
    if image.dtype.kind != "f" or variance.dtype.kind != "f":
        raise WarpRejected(path, "IMAGE and VARIANCE must be floating point")
    if mask_raw.dtype.kind not in "iu":
        raise WarpRejected(path, "MASK must be an integer image")

    xy0 = pixel_origin(path, ih)
    box = Box(xy0[0], xy0[1], xy0[0] + image.shape[1], xy0[1] + image.shape[0])
    _check_wcs(path, ih, tract, xy0)

    planes = planes_from_header(msk_hdu.header)
    if not planes:
        raise WarpRejected(path, "MASK header has no MP_<NAME> keywords naming its bit planes")
    if any(not 0 <= b < 32 for b in planes.values()):
        raise WarpRejected(path, "MASK MP_* bit indices must be in 0..31")
    mask, unknown = remap_to_canonical(_native(mask_raw, np.int32), planes)
    image = _native(image, np.float32)
    variance = _native(variance, np.float32)

    nodata = (mask & NO_DATA) != 0
    checked = ~nodata & ((mask & bitmask(bad_planes)) == 0)
    _check_good_pixels(path, image, variance, checked, box)

    psf = _read_psf(path, hdul)
    noise = []
    for k in range(noise_realizations):
        name = f"NOISE{k}"
        if name not in hdul:
            raise WarpRejected(path, f"missing HDU {name}: the state coadds {noise_realizations} "
                                     "noise realization(s), so every warp must carry them")
        n = hdul[name].data
        if n is None or n.shape != image.shape:
            raise WarpRejected(path, f"{name} shape differs from IMAGE shape {image.shape}")
        n = _native(n, np.float32)
        if not np.isfinite(n[checked]).all():
            raise WarpRejected(path, f"{name} has non-finite values in good pixels")
        noise.append(n)

    return Warp(path=path, content_hash=content_hash,
                id=WarpId(tract_id, visit, detector), band=band, xy0=xy0,
                image=image, mask=mask, variance=variance, psf=psf, noise=noise,
                weight_override=weight, instrument=str(ph.get("INSTRUME", "")),
                physical_filter=str(ph.get("PHYSFILT", "")),
                mjd=float(ph.get("MJD-OBS", float("nan"))), unknown_planes=tuple(unknown))


def _native(arr: np.ndarray, dtype) -> np.ndarray:
    """``arr`` as native-endian ``dtype``. FITS data are big-endian: astropy hands us a
    private, writeable big-endian copy, which is byte-swapped in place rather than copied
    (a copy costs another 46 MB per plane of a patch warp, and fresh pages are slow)."""
    if not arr.dtype.isnative and arr.flags.writeable and arr.flags.c_contiguous:
        arr = arr.byteswap(inplace=True).view(arr.dtype.newbyteorder())
    return arr.astype(dtype, copy=False)


def pixel_origin(path, h) -> tuple[int, int]:
    """Tract pixel of array element [0, 0], from LTV1/2 or CRVAL1A/2A (WCSNAMEA PHYSICAL)."""
    found = []
    if "LTV1" in h and "LTV2" in h:
        found.append(("LTV1/LTV2", -h["LTV1"], -h["LTV2"]))
    if "CRVAL1A" in h and "CRVAL2A" in h:
        # afw writes CRPIX1A = 1, so CRVAL1A is the tract x of local pixel 0.
        crpix = (h.get("CRPIX1A", 1.0), h.get("CRPIX2A", 1.0))
        found.append(("CRVAL1A/CRVAL2A", h["CRVAL1A"] - (crpix[0] - 1),
                      h["CRVAL2A"] - (crpix[1] - 1)))
    if not found:
        raise WarpRejected(path, "IMAGE header gives no pixel origin: expected LTV1/LTV2 "
                                 "(= -x0, -y0) or CRVAL1A/CRVAL2A with WCSNAMEA = 'PHYSICAL'")
    origins = set()
    for name, x, y in found:
        if not (float(x).is_integer() and float(y).is_integer()) or max(abs(x), abs(y)) > 2**30:
            raise WarpRejected(path, f"pixel origin from {name} ({x}, {y}) is not a sane integer")
        origins.add((int(x), int(y)))
    if len(origins) > 1:
        raise WarpRejected(path, f"LTV1/LTV2 and CRVAL1A/CRVAL2A disagree on the pixel origin: {origins}")
    return origins.pop()


def _check_wcs(path, header, tract, xy0):
    """The IMAGE WCS must be the tract's grid shifted to ``xy0``."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            w = WCS(header, naxis=2)
        except Exception as e:  # noqa: BLE001 - astropy raises many kinds for broken WCS
            raise WarpRejected(path, f"IMAGE WCS cannot be parsed: {e}") from None
    if not w.has_celestial or "TAN" not in w.wcs.ctype[0]:
        raise WarpRejected(path, f"IMAGE WCS must be the tract's TAN projection, "
                                 f"got CTYPE {list(w.wcs.ctype)}")
    ny, nx = header.get("NAXIS2", 1), header.get("NAXIS1", 1)
    local = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [nx / 2, ny / 2]], float)
    try:
        world = w.pixel_to_world_values(local[:, 0], local[:, 1])
        tx, ty = tract.wcs().world_to_pixel_values(*world)
    except Exception as e:  # noqa: BLE001 - (as above)
        raise WarpRejected(path, f"IMAGE WCS cannot be evaluated: {e}") from None
    err = np.hypot(tx - (local[:, 0] + xy0[0]), ty - (local[:, 1] + xy0[1]))
    if not np.all(np.isfinite(err)) or err.max() > WCS_TOLERANCE_PX:
        raise WarpRejected(path, f"IMAGE WCS is not tract {tract.id}'s pixel grid at origin "
                                 f"{xy0} (off by up to {np.nanmax(err) if np.isfinite(err).any() else float('inf'):.3g} px); "
                                 "warps must be resampled onto the tract grid")


def _check_good_pixels(path, image, variance, good, box):
    for name, arr, test in (("IMAGE", image, np.isfinite), ("VARIANCE", variance, None)):
        if test is not None:
            bad = good & ~test(arr)
            what = "non-finite values"
        else:
            with np.errstate(invalid="ignore"):
                bad = good & ~(arr > 0) | good & ~np.isfinite(arr)
            what = "non-finite or non-positive values"
        n = int(np.count_nonzero(bad))
        if n:
            y, x = np.argwhere(bad)[0]
            raise WarpRejected(path, f"{name} has {what} in {n} good pixel(s) (first at tract "
                                     f"pixel x={box.x0 + x}, y={box.y0 + y}); mark them NO_DATA "
                                     "or BAD in the mask")


def _read_psf(path, hdul) -> PsfModel:
    hdu = _hdu(path, hdul, "PSF")
    stamps = np.asarray(hdu.data, dtype=np.float64)
    if stamps.ndim == 2:
        stamps = stamps[None]
        positions = None
    elif stamps.ndim == 3:
        if "PSFPOS" not in hdul:
            raise WarpRejected(path, "PSF is a cube but there is no PSFPOS table giving where "
                                     "each stamp applies")
        tab = hdul["PSFPOS"].data
        try:
            positions = np.column_stack([np.asarray(tab["x"], float), np.asarray(tab["y"], float)])
        except (KeyError, TypeError):
            raise WarpRejected(path, "PSFPOS table must have columns 'x' and 'y'") from None
        if len(positions) != len(stamps):
            raise WarpRejected(path, f"PSFPOS has {len(positions)} rows for {len(stamps)} PSF stamps")
        if not np.isfinite(positions).all():
            raise WarpRejected(path, "PSFPOS has non-finite positions")
    else:
        raise WarpRejected(path, f"PSF must be a 2-D stamp or a 3-D cube, got shape {stamps.shape}")
    h, w = stamps.shape[1:]
    if h % 2 == 0 or w % 2 == 0:
        raise WarpRejected(path, f"PSF stamps must have odd sizes to be centred, got {h}x{w}")
    if not np.isfinite(stamps).all():
        raise WarpRejected(path, "PSF has non-finite values")
    sums = stamps.sum(axis=(1, 2))
    if np.any(np.abs(sums - 1) > 0.1):
        raise WarpRejected(path, f"PSF stamps must sum to about 1, got sums from "
                                 f"{sums.min():.3g} to {sums.max():.3g}")
    if np.any(np.abs(sums - 1) > PSF_SUM_WARN):  # accepted, but LSST would flag it
        log.warning("%s: PSF stamp sums %.5g..%.5g are outside 1 +- %g (LSST's check); the "
                    "coadd PSF is the weighted mean of the stamps as given (sums recorded "
                    "per contributor as psf_sum)", path, sums.min(), sums.max(), PSF_SUM_WARN)
    return PsfModel(stamps=stamps, positions=positions)
