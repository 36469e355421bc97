"""Mask planes: the state's canonical bit assignment and remapping of a warp's bits.

Warps name their planes with ``MP_<NAME> = bit`` header keywords; bit numbers are never
assumed.  Inside streamcoadd every mask uses the canonical bits below (afw's usual order),
so coadd masks can be OR-ed across warps from different producers.
"""

from __future__ import annotations

import numpy as np

CANONICAL_PLANES: dict[str, int] = {
    name: bit for bit, name in enumerate([
        "BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT",
        "NO_DATA", "CROSSTALK", "NOT_DEBLENDED", "UNMASKEDNAN", "CLIPPED", "INEXACT_PSF",
        "REJECTED", "SENSOR_EDGE", "STREAK", "VIGNETTED", "SAT_TEMPLATE", "BRIGHT_OBJECT",
    ])
}


def bitmask(names) -> int:
    """OR of the canonical bits of ``names``."""
    out = 0
    for n in names:
        out |= 1 << CANONICAL_PLANES[n]
    return out


def planes_from_header(header) -> dict[str, int]:
    """``{name: bit}`` from a FITS header's ``MP_*`` keywords."""
    return {k[3:]: int(v) for k, v in header.items() if k.startswith("MP_")}


def remap_to_canonical(mask: np.ndarray, planes: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """Return ``(mask in canonical bits as int32, names of planes we do not know)``.

    Bits that already sit at their canonical place are kept with one AND; only the
    others are moved, so a warp written with the usual afw order costs one pass.
    """
    mask = np.asarray(mask)
    keep = 0
    moves = []
    unknown = []
    for name, bit in planes.items():
        if name not in CANONICAL_PLANES:
            unknown.append(name)
        elif CANONICAL_PLANES[name] == bit:
            keep |= 1 << bit
        else:
            moves.append((bit, CANONICAL_PLANES[name]))
    out = np.bitwise_and(mask, np.int32(keep), dtype=np.int32)
    for src, dst in moves:
        out |= ((mask >> src) & 1).astype(np.int32) << dst
    return out, unknown
