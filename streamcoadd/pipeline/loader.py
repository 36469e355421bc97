"""Read, validate and prepare warps one ahead of the fold, on a second core.

Reading a warp (file bytes, SHA-256, FITS parsing, validation) and preparing it (the
clipped-mean weight, interpolation of bad pixels) does not touch the state, and most of it
is numpy, hashlib and file I/O, which release the GIL. A :class:`WarpLoader` does that work
(:func:`streamcoadd.pipeline.source.load_warp`) in one background thread for the *next*
file while the caller folds the current one; on a 2-core machine this hides most of it
(measured in ``docs/benchmarks.md``).

At most ``depth`` warps are loaded ahead (each is a few hundred MB for a patch-sized warp),
and every load runs in the same single thread, so loads never run concurrently with each
other; within a load, the file is hashed as it is read and a helper thread computes the
weight while the loader interpolates. Results, including rejections
(:class:`~streamcoadd.core.errors.WarpRejected`), are handed back by :meth:`WarpLoader.take`
exactly as a synchronous load would produce them.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import use_reference
from streamcoadd.core.skymap import SkyMap
from streamcoadd.pipeline.source import RoutedWarp, file_signature, load_warp


class WarpLoader:
    """Loads warps in a background thread, at most ``depth`` ahead of :meth:`take`."""

    def __init__(self, skymap: SkyMap, fold: FoldConfig, depth: int = 1):
        self.skymap = skymap
        self.fold = fold
        self.depth = max(0, depth)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="warp-loader") \
            if self.depth else None
        # weighs while the loader interpolates
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="warp-loader-aux") \
            if self.depth else None
        self._ahead: OrderedDict[str, Future] = OrderedDict()

    def _load(self, path: str) -> RoutedWarp:
        return load_warp(path, self.skymap, self.fold, aux=self._aux)

    def prefetch(self, path) -> None:
        """Start loading ``path`` in the background if fewer than ``depth`` loads are
        waiting to be taken (otherwise do nothing: :meth:`take` will load it)."""
        path = str(path)
        if self._pool is None or path in self._ahead or len(self._ahead) >= self.depth:
            return
        self._ahead[path] = self._pool.submit(self._load, path)

    def take(self, path) -> RoutedWarp:
        """The loaded warp for ``path`` (the prefetched result, or a load now). With the
        numpy reference fold (``STREAMCOADD_REFERENCE=fold``) the float64 products
        ``w·I``, ``w²·var`` are computed here, in the caller's thread, not ahead: the
        caller has released the previous warp's products by now, so two sets (185 MB each
        for a patch warp) are never held at once. The fused fold (the default) multiplies
        per pixel and needs none."""
        loaded = self._take(str(path))
        if loaded.prepared is not None and use_reference("fold"):
            loaded.prepared.with_products()
        return loaded

    def _take(self, path: str) -> RoutedWarp:
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
        return self._pool.submit(self._load, path).result()

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
