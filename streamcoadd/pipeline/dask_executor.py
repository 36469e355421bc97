"""Scale-out on Dask distributed: one writer per state shard, one owner of the commit record.

``streamcoadd ingest STATE PATH... --dask ADDRESS`` (``ADDRESS`` a scheduler such as
``tcp://host:8786``, or ``local:N`` for a :class:`distributed.LocalCluster` of N
single-threaded worker processes). See ``docs/scale-out.md`` for the design, the cost model
and how to run on a cluster.

Roles
-----
*Coordinator* (this process, :class:`DistributedIngestor`): holds the state's writer lock
and is the only one to write the ledger. For each warp it reads the file once (content
hash) and its primary/IMAGE headers (identity, band, pixel box), checks duplicates and
"same visit+detector, other content" against the ledger, the run and the shard manifests,
and queues the warp on every shard (patch, band) its box touches.

*Workers* (:mod:`streamcoadd.pipeline.dask_worker`, Dask tasks): a task takes a few
neighbouring shards homed on one worker and their queued warps, goes through the warps one
by one (each read and prepared once, folded into each of its shards in the task), then
commits every shard on its own, under the shard's lock with compare-and-swap on the
manifest's commit counter (``StateStore(shard_locking=True)``). A shard is in at most one
task in flight at any time (:class:`streamcoadd.pipeline.dask_dispatch.ShardDispatcher`
keeps a queue per shard and sends what is queued with the shard's next task once the
previous one returned), and many shards run in parallel. Connecting to the cluster and
checking it: :mod:`streamcoadd.pipeline.dask_cluster`.

Here: :class:`DistributedIngestor` (admission, and the final outcome of each warp),
:class:`ResultPump` (takes the finished tasks' results in) and :func:`run_distributed`.

A warp is *done* (ledger row written, outcome returned) only when every shard it feeds
has committed it, i.e. it is durable. Exactly-once holds under Dask's own behaviour:

- a task that runs twice (rerun after a lost result, a worker that was thought dead) finds
  the warp's hash in the shard manifest and skips it (status ``present``);
- two copies running at once: the second commit fails the compare-and-swap
  (``ShardConflict``), drops its work and retries from disk, where it finds the hashes;
- a worker that dies before the manifest rename leaves only debris (unnamed generations),
  removed under the shard lock by the next commit; Dask reruns the task elsewhere;
- if the coordinator dies, warps whose ledger row is missing are submitted again by the
  next run and shards that already hold them skip them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_reader import read_bytes
from streamcoadd.pipeline.admission import Admission, ContentVerdict
from streamcoadd.pipeline.dask_cluster import check_cluster, close, connect, first_line
from streamcoadd.pipeline.dask_dispatch import ShardDispatcher
from streamcoadd.pipeline.dask_worker import ShardKey, drop_worker_caches
from streamcoadd.pipeline.ingest import warp_records
from streamcoadd.pipeline.outcome import Outcome, OutcomeStatus
from streamcoadd.pipeline.source import contributing_patches, load_warp, probe_warp
from streamcoadd.store.state import StateStore

log = logging.getLogger("streamcoadd.pipeline.dask_executor")


@dataclass
class _Item:
    """One accepted warp on its way through the shard tasks (the coordinator's own
    bookkeeping: mutable, never leaves this process)."""

    outcome: Outcome
    abspath: str
    shards: set
    results: dict = field(default_factory=dict)  # shard key -> result dict
    errors: dict = field(default_factory=dict)  # shard key -> error text
    copies: list = field(default_factory=list)  # in-batch duplicates (pending Outcomes)

    @property
    def complete(self) -> bool:
        """Every shard it feeds has returned a result or failed."""
        return len(self.results) + len(self.errors) == len(self.shards)


class ResultPump:
    """Takes finished shard tasks in: each task's per-warp results (or its failure) go to
    the warps' :class:`_Item`, and the task's figures to :attr:`counts`.

    Parameters
    ----------
    dispatcher : ShardDispatcher
        Owns the tasks in flight (and sends stranded ones again).
    items : dict
        The coordinator's accepted warps by content hash (read here; the items' results
        and errors are filled in).
    """

    result_timeout = 5.0  # s to fetch a finished task's result before looking again later

    def __init__(self, dispatcher: ShardDispatcher, items: dict[str, _Item], *,
                 log_failures: bool, logger: logging.Logger, heartbeat=None):
        self.dispatcher = dispatcher
        self.items = items
        self.log_failures = log_failures
        self.log = logger
        self.heartbeat = heartbeat  # called about every second while waiting for tasks
        # shard_cached: tasks that found their shard in the worker's memory (else its
        # cells are read from disk); warps_read: warps read and prepared by workers;
        # cells_written: cell generations committed
        self.counts = {"tasks": 0, "shard_commits": 0, "task_seconds": 0.0,
                       "conflict_retries": 0, "present": 0, "shard_cached": 0,
                       "warps_read": 0, "cells_written": 0, "workers": set()}

    def take(self, block: bool) -> list[_Item]:
        """The warps whose every shard has answered, after taking in the finished tasks
        (``block``: wait up to about a second for one to finish first)."""
        from distributed import wait

        futures = self.dispatcher.futures
        if block:
            if self.heartbeat is not None:
                self.heartbeat()  # e.g. the systemd watchdog: waiting for workers is no hang
            self.dispatcher.rescue()
            futures = self.dispatcher.futures
            try:  # wake up regularly: Ctrl-C stays responsive
                wait(futures, timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
        finished = [f for f in futures if f.status in ("finished", "error", "cancelled")]
        complete: list[_Item] = []
        timeout = self.result_timeout
        for fut in finished:
            try:
                res, error = self._result(fut, timeout)
            except TimeoutError:
                timeout = 0.1
                continue
            groups = self.dispatcher.release(fut)
            fut.release()
            if error is not None:  # failed for good (retries exhausted), or cancelled
                self._failed(groups, error)
            else:
                self._take_result(res)
            for _, hashes in groups:
                for h in hashes:
                    it = self.items[h]
                    if it.complete and it not in complete:
                        complete.append(it)
        return complete

    @staticmethod
    def _result(fut, timeout: float) -> tuple[dict | None, BaseException | None]:
        """(result, None) or (None, error) of a finished, failed or cancelled task; raises
        TimeoutError if it cannot be had within ``timeout`` s."""
        if fut.status == "finished":
            try:
                # The result lives on the worker that ran the task; if that worker died
                # meanwhile Dask recomputes the task: do not block on it here (the
                # dispatcher's rescue sends it again should it be stranded).
                return fut.result(timeout=timeout), None
            except TimeoutError:
                raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001
                return None, e
        try:
            error = fut.exception(timeout=timeout)
        except TimeoutError:
            raise
        except BaseException as e:  # noqa: BLE001 - cancelled
            error = e
        return None, error or RuntimeError(f"task {fut.status}")

    def _failed(self, groups: list[tuple[ShardKey, list[str]]], error: BaseException) -> None:
        reason = f"shard task failed: {type(error).__name__}: {first_line(error)}"
        self.log.log(logging.ERROR if self.log_failures else logging.DEBUG,
                     "shard(s) %s: %s", ", ".join(str(g[0]) for g in groups), reason)
        for key, hashes in groups:
            for h in hashes:
                self.items[h].errors[key] = reason

    def _take_result(self, res: dict) -> None:
        st = self.counts
        st["tasks"] += 1
        st["task_seconds"] += res["seconds"]
        st["warps_read"] += res["warps_read"]
        st["workers"].add((res["host"], res["pid"]))
        for key, r in res["shards"].items():
            key = tuple(key)
            st["shard_commits"] += 1
            st["conflict_retries"] += r["attempts"] - 1
            st["shard_cached"] += bool(r["shard_cached"])
            st["cells_written"] += r["cells_written"]
            for x in r["results"]:
                self.items[x["hash"]].results[key] = x
                if x["status"] == "present":
                    st["present"] += 1


class DistributedIngestor:
    """The coordinator. Same contract as :class:`streamcoadd.pipeline.ingest.LocalIngestor`
    (the :class:`streamcoadd.pipeline.outcome.Ingestor` protocol: ``submit``, ``commit``,
    ``needs_commit``, ``pending``), so the daemon can use either: ``submit`` returns
    ``pending``, ``duplicate`` or ``rejected``; ``commit`` waits until every pending warp
    is durable in all its shards and returns their final outcomes.

    In addition ``collect()`` returns, without waiting, the outcomes of warps that became
    durable meanwhile (for pipelined callers such as ``ingest --dask``), and ``failed``
    lists warps whose shard tasks failed for good (worker lost too often, I/O error): they
    are NOT done; their files must be delivered again (a rerun finishes them exactly once).

    Work goes out when a waiting shard has ``batch`` warps queued (default
    ``run.commit_every``), or on ``commit``: then all the waiting shards of that shard's
    home worker go as one task (at most ``max_shards`` of them, default all; the worker
    commits whenever its uncommitted cells reach ``run.cache_gb``), each with up to
    ``max_batch`` (default 4 x ``batch``) warps. A shard's queue grows while it is in a
    task, which amortizes its next commit. Sending: :class:`ShardDispatcher`; taking the
    results in: :class:`ResultPump`.
    """

    def __init__(self, store, run: RunConfig = RunConfig(), client=None, *,
                 batch: int | None = None, max_batch: int | None = None, retries: int = 3,
                 prepared_cache_gb: float = 1.0, allow_refold: bool = False,
                 log_failures: bool = False, logger: logging.Logger | None = None,
                 heartbeat=None, max_shards: int | None = None):
        if not store.write or store.shard_locking:
            raise ValueError("the coordinator needs the state opened by its single writer")
        if client is None:
            from distributed import get_client

            client = get_client()
        self.store = store
        self.run = run
        self.client = client
        self.root = str(Path(store.root).absolute())
        self.batch = max(1, batch or run.commit_every)
        self.max_batch = max(self.batch, max_batch or 4 * self.batch)
        self.admission = Admission(store, allow_refold)
        self.log_failures = log_failures  # the daemon: failed warps are logged, not kept
        self.log = logger or log
        self._items: dict[str, _Item] = {}  # by content hash: accepted, not yet final
        # Shards per task: all the waiting shards of a worker by default (a warp feeding
        # several is then prepared once there); the worker bounds its memory by committing
        # whenever its uncommitted cells reach cache_gb, as the local ingestor does.
        self._dispatcher = ShardDispatcher(
            client, self.root, store.skymap, batch=self.batch, max_batch=self.max_batch,
            max_shards=max(1, max_shards or 1 << 30), retries=retries,
            cache_bytes=int(run.cache_gb * 1e9),
            prepared_cache_bytes=int(prepared_cache_gb * 1e9), log=self.log)
        self._results = ResultPump(self._dispatcher, self._items, log_failures=log_failures,
                                   logger=self.log, heartbeat=heartbeat)
        self._ready: list[Outcome] = []
        self._first_pending_at: float | None = None
        self.failed: list[Outcome] = []

    @property
    def stats(self) -> DaskStats:
        """What the cluster did so far (a frozen snapshot)."""
        counts = self._results.counts
        return DaskStats(**{**counts, "workers": frozenset(counts["workers"]),
                            "rescued": self._dispatcher.rescued})

    # ------------------------------------------------------------------ Ingestor contract
    @property
    def pending(self) -> int:
        """Warps (and in-batch copies) whose final outcome has not been returned."""
        return len(self._items) + sum(len(it.copies) for it in self._items.values()) \
            + len(self._ready)

    def close(self) -> None:
        """Nothing to release here: the caller owns the client (pending work is not
        committed: call commit first)."""

    def needs_commit(self) -> bool:
        if not self._items:
            return False
        return (len(self._items) >= self.run.commit_every
                or time.monotonic() - self._first_pending_at >= self.run.commit_interval)

    def submit(self, path, then=None) -> Outcome:
        """``then`` (the next file, for the local ingestor's loader) is not used: workers
        read the warps."""
        t0 = time.perf_counter()
        path = str(path)
        try:
            outcome = self._submit(path)
        except WarpRejected as e:
            self.store.ledger.record_rejection(path, e.reason)
            outcome = Outcome(path, OutcomeStatus.REJECTED, reason=e.reason)
        outcome = replace(outcome, ms=(time.perf_counter() - t0) * 1e3)
        self._pump(block=False)
        return outcome

    def commit(self) -> list[Outcome]:
        """Send every queued warp and wait until all pending warps are final. Returns the
        outcomes (folded / no_cells) not returned by ``collect`` yet; failures go to
        ``failed``."""
        with self._dispatcher.flush():
            while self._items:
                self._pump(block=True)
                if self._items and self._dispatcher.idle:
                    raise RuntimeError(f"{len(self._items)} pending warp(s) with no shard "
                                       "task (a bug in the coordinator); they stay undone")
        return self.collect()

    def collect(self) -> list[Outcome]:
        """Outcomes of warps that became durable since the last call (no waiting)."""
        self._pump(block=False)
        out, self._ready = self._ready, []
        return out

    def wait_below(self, n: int) -> None:
        """Block until at most ``n`` warps are pending (back-pressure for callers that
        submit faster than the cluster folds)."""
        with self._dispatcher.flush():  # do not hold back partial batches while we wait
            while len(self._items) > n:
                self._pump(block=True)

    def take_failed(self) -> list[Outcome]:
        out, self.failed = self.failed, []
        return out

    # ------------------------------------------------------------------ submit
    def _submit(self, path: str) -> Outcome:
        store = self.store
        data = read_bytes(path)
        h = file_hash(data)
        seen = self.admission.by_content(path, h)
        if seen.verdict == ContentVerdict.DUPLICATE:
            return Outcome(path, OutcomeStatus.DUPLICATE,
                           reason=f"already folded from {seen.original}",
                           warp_id=seen.warp_id, band=seen.band, content_hash=h)
        if seen.verdict == ContentVerdict.IN_BATCH:
            # Not durable yet: acknowledged with the original, when it is final.
            item = self._items[h]
            copy = replace(item.outcome, path=path, reason=f"same content as {seen.original}")
            item.copies.append(copy)
            return copy
        p = probe_warp(path, data, store.skymap, store.fold)
        del data
        wid = p.warp_id
        self.admission.by_identity(path, h, wid)
        tract = store.skymap.tract(wid.tract)
        keys = [(pt.tract, pt.x, pt.y, p.band)
                for pt in contributing_patches(tract, p.box, store.fold)]
        outcome = Outcome(path, OutcomeStatus.PENDING, warp_id=wid, band=p.band, content_hash=h,
                          pixels=p.box.width * p.box.height)
        if not keys:
            # Touches no patch: validate it fully here (nobody else will), then it is seen.
            loaded = load_warp(path, store.skymap, store.fold, expect_hash=h, patches=())
            if loaded.rejection is not None:
                raise loaded.rejection
            item = _Item(replace(outcome, weight=loaded.prepared.weight), path, set())
            self._items[h] = item
            self._finish([item])
            return outcome
        abspath = str(Path(path).absolute())
        if not self._items:
            self._first_pending_at = time.monotonic()
        self._items[h] = _Item(outcome, abspath, set(keys))
        self.admission.add_pending(path, h, wid)
        self._dispatcher.enqueue(abspath, h, keys)
        return outcome

    # ------------------------------------------------------------------ results
    def _pump(self, block: bool) -> None:
        """Dispatch what can go, take in finished tasks, finalize complete warps."""
        self._dispatcher.dispatch()
        if not self._dispatcher.futures:
            return
        complete = self._results.take(block)
        if complete:
            self._finish(complete)
        self._dispatcher.dispatch()

    def _finish(self, items: list[_Item]) -> None:
        """Decide each complete warp; one ledger transaction for all that are done. The
        in-batch copies of a warp get their outcome now, with it: duplicate once it is
        durable, else the original's failure or rejection."""
        done, failed, rejected = [], [], []
        for it in items:
            self._items.pop(it.outcome.content_hash, None)
            o = self._decide(it)
            if o.status == OutcomeStatus.FAILED:
                failed += [o, *(replace(c, status=o.status, reason=o.reason) for c in it.copies)]
            elif o.status == OutcomeStatus.REJECTED:
                rejected += [o, *(replace(c, status=o.status, reason=o.reason) for c in it.copies)]
            else:
                done.append((o, it))
        self.store.ledger.record_warps(warp_records([o for o, _ in done]))
        self.admission.committed([(o.content_hash, o.warp_id, o.cells > 0) for o, _ in done])
        for o in failed:
            self.admission.drop_pending(o.content_hash)
            if self.log_failures:
                self.log.error("%s not folded: %s; it stays in the inbox and is taken "
                               "again", o.path, o.reason)
            else:
                self.failed.append(o)
        for o in rejected:
            self.admission.drop_pending(o.content_hash)
            self.store.ledger.record_rejection(o.path, o.reason)
        self._ready += rejected
        for o, it in done:
            self._ready += [o, *(replace(c, status=OutcomeStatus.DUPLICATE) for c in it.copies)]
        if not self._items:
            self._first_pending_at = None

    @staticmethod
    def _decide(it: _Item) -> Outcome:
        """The final outcome of one warp from its shards' results."""
        o = it.outcome
        statuses = {r["status"] for r in it.results.values()}
        reasons = [r["reason"] for r in it.results.values() if r["reason"]]
        if it.errors or statuses & {"changed", "conflict", "misrouted"} or \
                ("rejected" in statuses and len(statuses) > 1):
            reason = "; ".join(sorted(set(it.errors.values()) | set(reasons))) + \
                " (not done: deliver the file again; shards that hold it skip it)"
            return replace(o, status=OutcomeStatus.FAILED, reason=reason)
        if statuses == {"rejected"}:
            return replace(o, status=OutcomeStatus.REJECTED, reason=reasons[0])
        cells = sum(r["cells"] for r in it.results.values())
        return replace(o, status=OutcomeStatus.FOLDED if cells else OutcomeStatus.NO_CELLS,
                       cells=cells,
                       ms=sum(r.get("ms", 0.0) for r in it.results.values()) or o.ms,
                       weight=next(iter(it.results.values()))["weight"] if it.results
                       else o.weight)


@dataclass(frozen=True)
class DaskStats:
    """What the cluster did in one :func:`run_distributed`.

    Attributes
    ----------
    tasks : int
        Shard tasks that returned.
    shard_commits : int
        Shard commits (one per shard per task).
    task_seconds : float
        Wall time summed over tasks, s.
    conflict_retries : int
        Compare-and-swap retries (another copy of a task committed first).
    present : int
        (warp, shard) pairs found already durable (reruns, replays).
    shard_cached : int
        Shard tasks that found their shard in the worker's memory.
    warps_read : int
        Warps read and prepared by workers (a warp feeding shards on two workers: 2).
    cells_written : int
        Cell generations committed.
    rescued : int
        Tasks sent again after being stranded on a vanished worker.
    workers : frozenset of (host, pid)
        Worker processes that ran tasks.
    """

    tasks: int = 0
    shard_commits: int = 0
    task_seconds: float = 0.0
    conflict_retries: int = 0
    present: int = 0
    shard_cached: int = 0
    warps_read: int = 0
    cells_written: int = 0
    rescued: int = 0
    workers: frozenset = frozenset()


@dataclass(frozen=True)
class DistributedRun:
    """The result of :func:`run_distributed`: one final outcome per file, in the order
    they became final, and the cluster's statistics."""

    outcomes: tuple[Outcome, ...]
    stats: DaskStats


def run_distributed(state, paths, address="local:2", run_config: RunConfig = RunConfig(),
                    *, client=None, batch: int | None = None, retries: int = 3,
                    progress=None, store=None, allow_refold: bool = False) -> DistributedRun:
    """Fold warp files into ``state`` on a Dask cluster.

    Parameters
    ----------
    state : path
        The state directory (opened for writing here unless ``store`` is given).
    paths : iterable of path
        Warp files.
    address : str
        Scheduler address, or ``local:N`` (used only without ``client``).
    client : distributed.Client, optional
        An existing client (else one is made from ``address`` and closed at the end).
    batch, retries
        Warps per shard task; retries of a failed task.
    progress : callable, optional
        ``progress(outcome)`` for every final outcome.

    Returns
    -------
    DistributedRun
        Outcomes: folded, no_cells, duplicate, rejected, or failed (not done: deliver
        again).
    """
    own_client = client is None
    if own_client:
        client = connect(address)
        try:
            check_cluster(client)
        except BaseException:
            close(client)
            raise
    own_store = store is None
    if own_store:
        store = StateStore.open(state, write=True)
    outcomes: list[Outcome] = []

    def report(os_):
        for o in os_:
            outcomes.append(o)
            if progress is not None:
                progress(o)

    try:
        ing = DistributedIngestor(store, run_config, client, batch=batch, retries=retries,
                                  allow_refold=allow_refold)
        _feed(ing, paths, report)
        try:
            client.run(drop_worker_caches, ing.root)
        except Exception:  # noqa: BLE001 - a worker just lost; its memory is gone anyway
            pass
    finally:
        if own_store:
            store.close()
        if own_client:
            close(client)
    return DistributedRun(tuple(outcomes), ing.stats)


def _feed(ing: DistributedIngestor, paths, report) -> None:
    """Submit every file, pipelined: ``report`` gets each final outcome as soon as it is
    known; at most a window of warps is pending at once (back-pressure)."""
    window = max(4 * ing.max_batch, 64)
    for p in paths:
        o = ing.submit(p)
        if o.status != OutcomeStatus.PENDING:
            report([o])
        report(ing.collect())
        report(ing.take_failed())
        if ing.pending > window:
            ing.wait_below(window // 2)
            report(ing.collect())
            report(ing.take_failed())
    report(ing.commit())
    report(ing.take_failed())
