"""What happened to one warp file, and the contract every ingestor keeps.

Shared by the local ingestor (:class:`streamcoadd.pipeline.ingest.LocalIngestor`), the Dask
coordinator (:class:`streamcoadd.pipeline.dask_executor.DistributedIngestor`) and their
callers (``streamcoadd ingest``, the daemon).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from streamcoadd.core.warp import WarpId


class OutcomeStatus(str, Enum):
    """The status of one file. A ``str``: compares equal to its value (``"folded"``),
    formats as it and serialises to JSON as it."""

    #: folded in memory, not durable yet: keep the file; ``commit()`` returns the final outcome
    PENDING = "pending"
    #: durable in every shard it feeds, ledger row written
    FOLDED = "folded"
    #: valid, but fully covers no cell (recorded as seen)
    NO_CELLS = "no_cells"
    #: the same content is in the state already (durable: safe to drop the file)
    DUPLICATE = "duplicate"
    #: refused for good; ``reason`` says why and what to do
    REJECTED = "rejected"
    #: not done (a shard task failed for good): deliver the file again
    FAILED = "failed"

    # The value, not "OutcomeStatus.FOLDED", in messages and f-strings (Python >= 3.10;
    # enum.StrEnum would do this but needs 3.11).
    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def final(self) -> bool:
        """True for every status but ``pending``."""
        return self is not OutcomeStatus.PENDING


@dataclass(frozen=True)
class Outcome:
    """The outcome of one file (frozen: a new record is made when the status changes).

    Attributes
    ----------
    path : str
        The file as submitted.
    status : OutcomeStatus
    reason : str
        Why it was rejected or failed, or what it duplicates ("" otherwise).
    warp_id : WarpId or None
        (tract, visit, detector), when the headers could be read.
    band : str
    cells : int
        Cells the warp contributes to (over all its shards).
    ms : float
        Wall time of ``submit`` for this file, milliseconds.
    content_hash : str
        SHA-256 of the file as delivered (hex), "" if unreadable.
    weight : float
        The scalar weight folded with, 1/nJy^2 (0 until known).
    pixels : int
        Input pixels of the warp's IMAGE plane, H * W (0 until known), for throughput
        figures (input Mpix/s) without opening the file again.
    """

    path: str
    status: OutcomeStatus
    reason: str = ""
    warp_id: WarpId | None = None
    band: str = ""
    cells: int = 0
    ms: float = 0.0
    content_hash: str = ""
    weight: float = 0.0
    pixels: int = 0


@runtime_checkable
class Ingestor(Protocol):
    """What the daemon and ``streamcoadd ingest`` need from an ingestor.

    A file must be kept (it is the replay log) until an outcome with a final status other
    than ``pending`` has been returned for it, by ``submit`` or by ``commit``. Statuses
    returned by ``submit``: pending, duplicate (already durable), rejected. ``commit``
    returns the final outcome of every pending file, including in-batch duplicates, which
    are released only once their original is durable.
    """

    @property
    def pending(self) -> int:
        """Files submitted whose final outcome has not been returned yet."""
        ...

    def submit(self, path, then=None) -> Outcome:
        """Take one file; ``then``: the file that will be submitted next (a hint)."""
        ...

    def needs_commit(self) -> bool:
        """True when the batch is due (size, age or memory)."""
        ...

    def commit(self) -> list[Outcome]:
        """Make every pending file durable; their final outcomes."""
        ...

    def close(self) -> None:
        """Release threads and caches (pending work is not committed)."""
        ...
