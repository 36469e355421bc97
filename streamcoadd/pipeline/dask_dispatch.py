"""The Dask coordinator's dispatcher: which shard goes to which worker, and when.

A shard (patch, band) is in at most one task in flight at any time: warps wait in a queue
per shard and go with the shard's next task once the previous one returned. Every shard
has a *home* worker (near-square blocks of patches, :func:`block_grid`) that keeps its
accumulators in memory between tasks; all the waiting shards of one home go as one task
(:func:`streamcoadd.pipeline.dask_worker.fold_shards`), so that a warp feeding several of
them is read and prepared once there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from streamcoadd.core.skymap import SkyMap
from streamcoadd.pipeline.dask_cluster import first_line
from streamcoadd.pipeline.dask_worker import ShardKey, fold_shards

Queued = tuple[str, str]  # (absolute path, sha256) of one warp, as a worker reads it


def block_grid(n: int, nx: int, ny: int) -> tuple[int, int]:
    """(bx, by) with bx * by == n blocks over an nx x ny patch grid, the blocks as square as
    possible (least total boundary: the sum of the block sides nx / bx + ny / by smallest)."""
    return min(((d, n // d) for d in range(1, n + 1) if n % d == 0),
               key=lambda b: (max(nx / b[0], ny / b[1]) / min(nx / b[0], ny / b[1]),
                              b[0] * ny + b[1] * nx))


def _shard_order(k: ShardKey) -> tuple:
    """Band, then patch x, y: neighbouring patches of one band go together."""
    return (k[3], k[1], k[2])


class ShardDispatcher:
    """Queues warps per shard and sends shard tasks to the shards' home workers.

    Parameters
    ----------
    client : distributed.Client
    root : str
        The state directory, absolute (the workers open it).
    skymap : SkyMap
        The state's skymap (patch grids, for the shard homes).
    batch, max_batch : int
        A shard's work goes out once it has ``batch`` warps queued (or within
        :meth:`flush`), at most ``max_batch`` warps per shard per task.
    max_shards : int
        Shards per task at most.
    retries : int
        Dask retries of a failed task.
    cache_bytes, prepared_cache_bytes : int
        The worker's uncommitted-cell and prepared-warp memory bounds, bytes.
    log : logging.Logger
    """

    rescue_interval = 5.0  # s between checks for tasks stranded on vanished workers

    def __init__(self, client, root: str, skymap: SkyMap, *, batch: int, max_batch: int,
                 max_shards: int, retries: int, cache_bytes: int, prepared_cache_bytes: int,
                 log: logging.Logger):
        self.client = client
        self.root = root
        self.skymap = skymap
        self.batch = batch
        self.max_batch = max_batch
        self.max_shards = max_shards
        self.retries = retries
        self.cache_bytes = cache_bytes
        self.prepared_cache_bytes = prepared_cache_bytes
        self.log = log
        self._queues: dict[ShardKey, list[Queued]] = {}  # shard -> warps waiting for a task
        self._busy: dict[ShardKey, object] = {}  # shard -> its one future in flight
        # future -> ([(shard, warps)], worker it was placed on or None)
        self._tasks: dict[object, tuple[list[tuple[ShardKey, list[Queued]]], str | None]] = {}
        self._home: dict[ShardKey, str] = {}  # shard -> worker that holds it in memory
        self._inflight: dict[str, int] = {}  # worker -> tasks placed there, not finished
        self._workers: dict[str, int] = {}  # live worker -> threads
        self._workers_at = -1e9
        self._rescue_at = time.monotonic()
        self._flushing = False
        self.rescued = 0  # tasks sent again after being stranded on a vanished worker

    # ------------------------------------------------------------------ the coordinator's view
    def enqueue(self, abspath: str, h: str, keys: list[ShardKey]) -> None:
        """Queue warp ``h`` (read by the workers from ``abspath``) on its shards ``keys``."""
        for key in keys:
            self._queues.setdefault(key, []).append((abspath, h))

    @property
    def futures(self) -> list:
        """The shard tasks in flight."""
        return list(self._tasks)

    @property
    def idle(self) -> bool:
        """No task in flight and nothing queued."""
        return not self._tasks and not any(self._queues.values())

    @contextmanager
    def flush(self) -> Iterator[None]:
        """Within: partial batches go out too (the caller waits for every queued warp)."""
        self._flushing, before = True, self._flushing
        try:
            yield
        finally:
            self._flushing = before

    def release(self, fut) -> list[tuple[ShardKey, list[str]]]:
        """Forget a finished (or failed) task; its [(shard, warp hashes)]."""
        return [(key, [h for _, h in warps]) for key, warps in self._release(fut)]

    # ------------------------------------------------------------------ placement
    def _live_workers(self, force: bool = False) -> dict[str, int]:
        now = time.monotonic()
        if force or now - self._workers_at > 2.0:
            try:
                self._workers = dict(self.client.nthreads())
            except Exception:  # noqa: BLE001 - scheduler unreachable: keep the last view
                pass
            self._workers_at = now
        return self._workers

    def dispatch(self) -> None:
        """Send work for idle shards. Shards are grouped by their home worker into one task
        per free worker thread (neighbouring patches: a warp feeding several of them is
        read once). Nothing goes out until some idle shard has ``batch`` warps queued (or
        the caller flushes); then every idle shard of that worker with queued warps goes
        along."""
        idle = [k for k, q in self._queues.items() if q and k not in self._busy]
        if not idle:
            return
        if not self._flushing and not any(len(self._queues[k]) >= self.batch for k in idle):
            return
        workers = self._live_workers()
        if not workers:  # no placement possible: one task per shard, Dask decides
            for key in idle:
                self._send([key], None)
            return
        by_worker: dict[str, list[ShardKey]] = {w: [] for w in workers}
        for key in idle:
            home = self._home.get(key)
            if home not in workers:
                home = self._home[key] = self._spatial_home(key, sorted(workers))
            by_worker[home].append(key)
        free = {w: workers[w] - self._inflight.get(w, 0) for w in workers}
        self._rebalance(by_worker, free)
        for w, keys in by_worker.items():
            keys = sorted(keys, key=_shard_order)
            while keys and free[w] > 0:
                if not self._flushing and not any(len(self._queues[k]) >= self.batch
                                                  for k in keys):
                    break  # this worker's shards keep filling until one has a batch
                chunk, keys = keys[:self.max_shards], keys[self.max_shards:]
                self._send(chunk, w)
                free[w] -= 1

    def _rebalance(self, by_worker: dict[str, list[ShardKey]], free: dict[str, int]) -> None:
        """A worker with a free thread and no shard of its own takes over half of the
        waiting shards of the busiest worker (they become its shards)."""
        for w in sorted(by_worker, key=lambda w: -free[w]):
            if free[w] <= 0 or by_worker[w]:
                continue
            donor = max(by_worker, key=lambda v: sum(len(self._queues[k]) for k in by_worker[v]))
            keys = sorted(by_worker[donor], key=_shard_order)
            if len(keys) < 2 and free[donor] > 0:
                continue
            take = keys[len(keys) // 2:] if len(keys) > 1 else keys
            by_worker[donor] = [k for k in by_worker[donor] if k not in take]
            by_worker[w] = take
            for k in take:
                self._home[k] = w

    def _spatial_home(self, key: ShardKey, workers: list[str]) -> str:
        """A first home for a shard: the tract's patch grid cut into one contiguous,
        near-square block of patches per worker. A warp crossing a block boundary is read
        and prepared on both sides: square blocks have the least boundary per area
        (columns of one patch would make every detector warp cross one)."""
        t, x, y, _ = key
        nx, ny = self.skymap.tract(t).num_patches
        bx, by = block_grid(len(workers), nx, ny)
        return workers[(x * bx // nx) * by + y * by // ny]

    # ------------------------------------------------------------------ tasks
    def _send(self, keys: list[ShardKey], worker: str | None) -> None:
        groups = []
        for key in keys:
            queue = self._queues[key]
            warps, self._queues[key] = queue[:self.max_batch], queue[self.max_batch:]
            groups.append((key, warps))
        name = "-".join(f"{k[1]}.{k[2]}{k[3]}" for k in keys[:4]) + ("..." if len(keys) > 4 else "")
        fut = self.client.submit(
            fold_shards, self.root, groups, self.cache_bytes, self.prepared_cache_bytes,
            key=f"streamcoadd-fold-{name}-{uuid.uuid4().hex[:12]}", pure=False,
            retries=self.retries,
            **({"workers": [worker], "allow_other_workers": True} if worker else {}))
        for key, _ in groups:
            self._busy[key] = fut
        self._tasks[fut] = (groups, worker)
        if worker is not None:
            self._inflight[worker] = self._inflight.get(worker, 0) + 1

    def _release(self, fut) -> list[tuple[ShardKey, list[Queued]]]:
        groups, worker = self._tasks.pop(fut)
        for key, _ in groups:
            del self._busy[key]
        if worker is not None:
            self._inflight[worker] = self._inflight.get(worker, 0) - 1
        return groups

    def rescue(self) -> None:
        """Send again tasks stranded on a vanished worker. A placement is only a
        preference, but Dask does not apply that to tasks that were left with no worker at
        all (every worker lost at once, e.g. a batch allocation ending) when new workers
        join: such a task stays 'no-worker' for ever. Cancel it and queue its warps again.
        Should the old copy run after all, the shard's compare-and-swap and manifest hashes
        make it harmless."""
        now = time.monotonic()
        if now - self._rescue_at < self.rescue_interval:
            return
        self._rescue_at = now
        live = self._live_workers(force=True)
        if not live:
            return
        # finished ones too: their result was on the vanished worker and is recomputed
        gone = {f.key: f for f, (_, w) in self._tasks.items() if w is not None and w not in live}
        if not gone:
            return

        def task_states(keys, dask_scheduler=None):  # nested: pickled by value
            return {k: (ts.state if (ts := dask_scheduler.tasks.get(k)) is not None else None)
                    for k in keys}

        try:
            states = self.client.run_on_scheduler(task_states, list(gone))
        except Exception as e:  # noqa: BLE001
            self.log.warning("cannot ask the scheduler about stranded tasks: %s", first_line(e))
            return
        for k, fut in gone.items():
            if states.get(k) != "no-worker":
                continue
            worker = self._tasks[fut][1]
            groups = self._release(fut)
            fut.cancel()
            self.rescued += 1
            self.log.warning("task for shard(s) %s stranded on vanished worker %s; sending "
                             "it again", ", ".join(map(str, (g[0] for g in groups))), worker)
            for key, warps in groups:
                self._queues[key] = warps + self._queues.get(key, [])
                self._home.pop(key, None)
        with self.flush():
            self.dispatch()
