"""The one admission of a warp: new, duplicate, in-batch copy, refold, or conflict.

Both executors (local and Dask) ask the same :class:`Admission` of their run:

1. :meth:`Admission.by_content` (the content hash alone): already in the state
   (``DUPLICATE``: durable, the file may go), a copy of a warp of the uncommitted batch
   (``IN_BATCH``: its outcome waits for the original's commit), retracted (refused unless
   refolding is allowed), or ``NEW``.
2. :meth:`Admission.by_identity` (the (tract, visit, detector) from the headers): refuses a
   file whose identity is already taken by other content, in the ledger, in the uncommitted
   batch, or in any shard manifest. The manifests matter after a crash between some of a
   warp's shard commits and its ledger row: that warp is in some shards but not in the
   ledger, and another file with its identity must not be folded before it is replayed.
3. :func:`shard_verdict`, per shard, when folding: fold, already present (a replay), or a
   conflict or misrouting the coordinator should have caught (a safety net).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.warp import WarpId
from streamcoadd.store.state import Shard, StateStore


class ContentVerdict(str, Enum):
    NEW = "new"
    #: the ledger has this content (durable): the file may be dropped
    DUPLICATE = "duplicate"
    #: the same content is in the uncommitted batch: acknowledge at its commit only
    IN_BATCH = "in_batch"
    #: retracted content folded again (``allow_refold``)
    REFOLD = "refold"


@dataclass(frozen=True)
class ContentAdmission:
    """``verdict``; for DUPLICATE and IN_BATCH, ``original`` (the path of the copy folded
    first) and, for DUPLICATE, the identity and band the ledger has."""

    verdict: ContentVerdict
    original: str = ""
    warp_id: WarpId | None = None
    band: str = ""


class ShardVerdict(str, Enum):
    FOLD = "fold"
    #: the shard holds this content already (durable or pending): a rerun or a replay
    PRESENT = "present"
    #: the shard holds the same (visit, detector) with other content
    CONFLICT = "conflict"
    #: the warp's tract or band is not the shard's
    MISROUTED = "misrouted"


def shard_verdict(shard: Shard, warp_id: WarpId, band: str, content_hash: str) -> ShardVerdict:
    """What to do with one warp in one shard (committed and pending warps both count)."""
    if band != shard.band or warp_id.tract != shard.patch.tract:
        return ShardVerdict.MISROUTED
    if content_hash in shard.warps or content_hash in shard.pending_warps:
        return ShardVerdict.PRESENT
    vd = (warp_id.visit, warp_id.detector)
    for k, v in (*shard.warps.items(), *shard.pending_warps.items()):
        if tuple(v) == vd and k != content_hash:
            return ShardVerdict.CONFLICT
    return ShardVerdict.FOLD


class Admission:
    """The admission rules of one ingest run, with its uncommitted batch.

    Parameters
    ----------
    store : StateStore
        The state, opened by its single writer.
    allow_refold : bool
        Fold again content that was retracted (else it is refused with a hint).
    """

    def __init__(self, store: StateStore, allow_refold: bool = False):
        self._store = store
        self.allow_refold = allow_refold
        self._batch_paths: dict[str, str] = {}  # content hash -> path, uncommitted batch
        self._batch_ids: dict[WarpId, tuple[str, str]] = {}  # id -> (hash, path)
        # (tract, visit, detector) -> hashes in any shard manifest, read on first use
        self._shard_ids: dict[WarpId, set[str]] | None = None

    def by_content(self, path: str, content_hash: str) -> ContentAdmission:
        """The hash-level verdict. Raises :class:`WarpRejected` for retracted content
        unless ``allow_refold``."""
        rec = self._store.ledger.get(content_hash)
        if rec is not None and rec.status != "retracted":
            return ContentAdmission(ContentVerdict.DUPLICATE, rec.path,
                                    WarpId(rec.tract, rec.visit, rec.detector), rec.band)
        original = self._batch_paths.get(content_hash)
        if original is not None:
            return ContentAdmission(ContentVerdict.IN_BATCH, original)
        if rec is None:
            return ContentAdmission(ContentVerdict.NEW)
        if not self.allow_refold:
            raise WarpRejected(path, f"visit {rec.visit} detector {rec.detector} was "
                                     "retracted; to fold it again use 'streamcoadd ingest "
                                     "--allow-refold'")
        return ContentAdmission(ContentVerdict.REFOLD)

    def by_identity(self, path: str, content_hash: str, wid: WarpId) -> None:
        """Raise :class:`WarpRejected` if ``wid`` is taken by other content: in the ledger,
        in the uncommitted batch, or in any shard's manifest (a warp half-committed by a
        run that stopped before its ledger row)."""
        for rec in self._store.ledger.find_id(wid.tract, wid.visit, wid.detector):
            if rec.content_hash != content_hash and rec.status != "retracted":
                raise WarpRejected(path, f"{wid} was already folded from {rec.path} with "
                                         "different content; retract it first if this file "
                                         "replaces it")
        other = self._batch_ids.get(wid)
        if other is not None and other[0] != content_hash:
            raise WarpRejected(path, f"{wid} is also in {other[1]} with different content")
        held = self._shard_identities().get(wid, set()) - {content_hash}
        if held:
            h = sorted(held)[0]
            raise WarpRejected(path, f"{wid} is already in the state's shards with different "
                                     f"content (sha256 {h[:12]}...), folded by a run that "
                                     "stopped before recording it: deliver that file again "
                                     "first (it completes it), then retract it if this file "
                                     "replaces it")

    def add_pending(self, path: str, content_hash: str, wid: WarpId) -> None:
        """A warp joined the uncommitted batch."""
        self._batch_paths[content_hash] = path
        self._batch_ids[wid] = (content_hash, path)

    def drop_pending(self, content_hash: str) -> None:
        """A warp left the batch without reaching any shard (failed for good)."""
        self._batch_paths.pop(content_hash, None)
        for wid, (h, _) in list(self._batch_ids.items()):
            if h == content_hash:
                del self._batch_ids[wid]

    def committed(self, items: list[tuple[str, WarpId, bool]]) -> None:
        """Warps of the batch are durable: ``[(hash, id, in_shards)]``; those that reached
        a shard join the manifest identities."""
        for h, wid, in_shards in items:
            self.drop_pending(h)
            if in_shards and self._shard_ids is not None:
                self._shard_ids.setdefault(wid, set()).add(h)

    def discard_pending(self) -> None:
        """The uncommitted batch was dropped (an error in the middle of a fold)."""
        self._batch_paths.clear()
        self._batch_ids.clear()

    def _shard_identities(self) -> dict[WarpId, set[str]]:
        """Every shard manifest's (tract, visit, detector) -> hashes, read once per run
        (this run is the only writer; its commits are added by :meth:`committed`). Reads
        every manifest once: ~1 ms per shard."""
        if self._shard_ids is None:
            ids: dict[WarpId, set[str]] = {}
            store = self._store
            for patch, band in store.shard_keys():
                manifest = store.load_manifest(patch, band)
                for h, (v, d) in (manifest.warps if manifest else {}).items():
                    ids.setdefault(WarpId(patch.tract, v, d), set()).add(h)
            self._shard_ids = ids
        return self._shard_ids
