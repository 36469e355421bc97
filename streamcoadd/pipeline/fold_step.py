"""The fold step, shared by both executors: a prepared warp into one shard, in memory.

The local ingestor and the Dask workers both call :func:`fold_into_shard`; the shard's
next commit (``StateStore.commit`` / ``commit_shard``) makes it durable.
"""

from __future__ import annotations

from streamcoadd.core.fold import CellInput, PreparedWarp, fold_cell
from streamcoadd.core.skymap import PatchId
from streamcoadd.store.state import Shard, StateStore


def fold_into_shard(store: StateStore, shard: Shard, inputs: list[CellInput],
                    prepared: PreparedWarp) -> int:
    """Fold ``prepared`` into the cells ``inputs`` of ``shard`` (in memory) and mark it
    pending in the shard, so that the shard's next commit lists its hash.

    The caller has checked (:func:`streamcoadd.pipeline.admission.shard_verdict`) that the
    shard does not hold the warp already. Returns the number of cells folded into.
    """
    for cin in inputs:
        fold_cell(store.cell_for_write(shard, cin.cell), cin, prepared, store.fold)
    if inputs:
        w = prepared.warp
        shard.add_pending(w.content_hash, w.id.visit, w.id.detector)
    return len(inputs)


def forget_shard(store: StateStore, patch: PatchId, band: str) -> None:
    """Drop the in-memory copy of one shard (uncommitted work included); the next
    ``store.shard`` reads it from disk again."""
    store.drop_shard(patch, band)


def cached_shard(store: StateStore, patch: PatchId, band: str) -> Shard | None:
    """The shard's in-memory copy, if the store holds one (without loading it)."""
    return store.cached_shard(patch, band)


def forget_shards(store: StateStore) -> None:
    """Drop every in-memory shard (a long-lived Dask worker frees its memory)."""
    store.drop_all_shards()
