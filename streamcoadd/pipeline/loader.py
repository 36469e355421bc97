"""Read, validate and prepare warps one ahead of the fold, on a second core.

Reading a warp (file bytes, SHA-256, FITS parsing, validation) and preparing it (the
clipped-mean weight, interpolation of bad pixels) does not touch the state, and most of it
is numpy, hashlib and file I/O, which release the GIL. A :class:`WarpLoader` does that work
in one background thread for the *next* file while the caller folds the current one; on a
2-core machine this hides most of it (measured in ``docs/benchmarks.md``).

At most ``depth`` warps are loaded ahead (each is a few hundred MB for a patch-sized warp),
and every load runs in the same single thread, so loads never run concurrently with each
other; within a load, a helper thread hashes the bytes and computes the weight while the
loader parses and interpolates. Results, including rejections (:class:`~streamcoadd.core.errors.WarpRejected`), are
handed back by :meth:`WarpLoader.take` exactly as a synchronous load would produce them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import (
    CellInput,
    PreparedWarp,
    good_variances,
    prepare_warp,
    shard_inputs,
    weight_from_variances,
)
from streamcoadd.core.skymap import PatchId, SkyMap
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_reader import read_bytes as read_bytes
from streamcoadd.io.warp_reader import read_warp


@dataclass
class LoadedWarp:
    """One file read ahead: its content hash, and the prepared warp with the cells it
    contributes to, per patch (overlap rule applied), or why it was rejected (exactly one
    of ``prepared`` and ``rejection`` is set)."""

    path: str
    content_hash: str
    prepared: PreparedWarp | None = None
    inputs: dict[PatchId, list[CellInput]] = field(default_factory=dict)
    rejection: WarpRejected | None = None
    signature: tuple | None = None  # (inode, size, mtime) of the file before it was read


def file_signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_warp(path: str, skymap: SkyMap, fold: FoldConfig,
              aux: ThreadPoolExecutor | None = None) -> LoadedWarp:
    """Read, hash, validate and prepare one warp file. With ``aux`` (a one-thread pool),
    the SHA-256 runs there while the FITS file is parsed, and the clipped-mean weight
    (on its own copy of the good variances) while the bad pixels are interpolated.
    Raises :class:`WarpRejected` only if the file cannot be read at all."""
    signature = file_signature(path)  # before reading: a later change shows as a mismatch
    data = read_bytes(path)
    hashing = aux.submit(file_hash, data) if aux is not None else None
    h = None if hashing else file_hash(data)
    try:
        warp = read_warp(path, skymap, fold.bad_planes, fold.noise_realizations, data=data,
                         content_hash=h or "")
    except WarpRejected as e:
        return LoadedWarp(path, h or hashing.result(), rejection=e, signature=signature)
    if hashing is not None:
        h = warp.content_hash = hashing.result()
    del data  # the parsed arrays are copies; free the raw bytes before preparing
    try:
        weight = warp.weight_override
        weighing = None
        if weight is None:
            var = good_variances(warp, fold)  # a copy: interpolation may proceed meanwhile
            if aux is not None:
                weighing = aux.submit(weight_from_variances, var, path)
            else:
                weight = weight_from_variances(var, path)
            del var
        prepared = prepare_warp(warp, fold, consume=True, weight=float("nan"))
        tract = skymap.tract(warp.id.tract)
        inputs = {patch: shard_inputs(prepared, tract, patch, fold)
                  for patch in tract.patches_overlapping(warp.box)}
        prepared.weight = weighing.result() if weighing is not None else weight
        return LoadedWarp(path, h, prepared=prepared, inputs=inputs, signature=signature)
    except WarpRejected as e:
        return LoadedWarp(path, h, rejection=e, signature=signature)


class WarpLoader:
    """Loads warps in a background thread, at most ``depth`` ahead of :meth:`take`."""

    def __init__(self, skymap: SkyMap, fold: FoldConfig, depth: int = 1):
        self.skymap = skymap
        self.fold = fold
        self.depth = max(0, depth)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="warp-loader") \
            if self.depth else None
        # hashes and weighs while the loader parses and interpolates
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="warp-loader-aux") \
            if self.depth else None
        self._ahead: OrderedDict[str, Future] = OrderedDict()

    def prefetch(self, path) -> None:
        """Start loading ``path`` in the background if fewer than ``depth`` loads are
        waiting to be taken (otherwise do nothing: :meth:`take` will load it)."""
        path = str(path)
        if self._pool is None or path in self._ahead or len(self._ahead) >= self.depth:
            return
        self._ahead[path] = self._pool.submit(load_warp, path, self.skymap, self.fold,
                                               self._aux)

    def take(self, path) -> LoadedWarp:
        """The loaded warp for ``path`` (the prefetched result, or a load now), with the
        float64 products ``w·I``, ``w²·var`` computed. They are computed here, in the
        caller's thread, not ahead: the caller has released the previous warp's products
        by now, so two sets (185 MB each for a patch warp) are never held at once."""
        loaded = self._take(str(path))
        if loaded.prepared is not None:
            loaded.prepared.with_products()
        return loaded

    def _take(self, path: str) -> LoadedWarp:
        fut = self._ahead.pop(path, None)
        if fut is not None:
            try:
                loaded = fut.result()
            except WarpRejected:  # unreadable then; look again now
                loaded = None
            # The file must still be the one that was read ahead (a re-delivery may have
            # replaced it meanwhile): else it is read again.
            if loaded is not None and loaded.signature is not None \
                    and loaded.signature == file_signature(path):
                return loaded
        if self._pool is None:
            return load_warp(path, self.skymap, self.fold)
        # through the loader thread, so that two loads never run at once
        return self._pool.submit(load_warp, path, self.skymap, self.fold, self._aux).result()

    def discard(self) -> None:
        """Forget loads that will not be taken (waits for the one running)."""
        for fut in self._ahead.values():
            fut.cancel()
        for fut in self._ahead.values():
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001  (the result is unwanted anyway)
                    pass
        self._ahead.clear()

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._aux.shutdown(wait=True)
            self._pool = self._aux = None
