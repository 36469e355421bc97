"""TODO docstring (cli.dask_options, split from distributed.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from streamcoadd.core.errors import UserError
from streamcoadd.io.warp_reader import pixel_origin as pixel_origin
from streamcoadd.io.warp_reader import read_bytes as read_bytes
from streamcoadd.pipeline.dask_executor import (
    DistributedIngestor,
    check_cluster,
    close,
    connect,
    drop_worker_caches,
    ingest_distributed,
)
from streamcoadd.pipeline.ingest import Outcome


def register_ingest_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scale-out (Dask distributed; docs/scale-out.md)")
    g.add_argument("--dask", metavar="ADDRESS",
                   help="fold on a Dask cluster: a scheduler address (tcp://host:8786) or "
                        "local:N for N local worker processes")
    g.add_argument("--dask-batch", type=int, metavar="N", dest="dask_batch",
                   help="warps per shard task when the shard is idle (default "
                        "--commit-every); a busy shard's next task takes up to 4N")
    g.add_argument("--dask-retries", type=int, default=3, metavar="N", dest="dask_retries",
                   help="retries of a failed shard task (default 3)")


def cmd_ingest_dask(args) -> int:
    from streamcoadd.cli.main import main as cli

    files = cli.warp_files(args.paths)
    rc = cli.run_config(args)
    if args.dask_batch is not None and args.dask_batch < 1:
        raise UserError("--dask-batch must be >= 1")
    counts = {"folded": 0, "no_cells": 0, "duplicate": 0, "rejected": 0, "failed": 0}
    bad: list[Outcome] = []
    t0 = time.perf_counter()
    bar = cli.progress_bar(len(files), args.quiet)

    def progress(o: Outcome) -> None:
        counts[o.status] = counts.get(o.status, 0) + 1
        if o.status in ("rejected", "failed"):
            bad.append(o)
        bar.update(1)
        bar.set_postfix_str(f"{Path(o.path).name}: {o.status}")

    try:
        ingest_distributed(args.state, files, args.dask, rc, batch=args.dask_batch,
                           retries=args.dask_retries, progress=progress,
                           allow_refold=getattr(args, "allow_refold", False))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    st = getattr(ingest_distributed, "last_stats", {})
    print(f"{len(files)} file(s) in {dt:.1f} s on Dask ({len(st.get('workers', ()))} "
          f"worker process(es), {st.get('tasks', 0)} shard task(s)): {counts['folded']} "
          f"folded, {counts['no_cells']} valid but covering no cell, {counts['duplicate']} "
          f"already present, {counts['rejected']} rejected, {counts['failed']} failed")
    by_reason: dict[tuple[str, str], list[str]] = {}
    for o in bad:
        by_reason.setdefault((o.status, o.reason), []).append(o.path)
    for (status, reason), paths in by_reason.items():
        if len(paths) == 1:
            print(f"  {status} {paths[0]}: {reason}")
        else:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            print(f"  {status} {len(paths)} files ({', '.join(paths[:3])}{more}): {reason}")
    return 1 if bad else 0


def cmd_watch_dask(args) -> int:
    """``streamcoadd watch ... --dask ADDRESS``: the daemon, folding on a Dask cluster.
    The daemon process is the coordinator (state lock, ledger, inbox); a batch of warps
    leaves the inbox only when every shard task of every warp in it has returned."""
    from streamcoadd.service import daemon

    if args.dask_batch is not None and args.dask_batch < 1:
        print("streamcoadd watch: --dask-batch must be >= 1", file=sys.stderr)
        return daemon.EXIT_ERROR
    try:
        client = connect(args.dask)
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return daemon.EXIT_ERROR
    try:
        check_cluster(client)
    except UserError as e:
        close(client)
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return daemon.EXIT_ERROR

    notify = daemon.SdNotify()

    def make_ingestor(store, run):
        return DistributedIngestor(store, run, client, batch=args.dask_batch,
                                   retries=args.dask_retries, log_failures=True,
                                   logger=daemon.log, heartbeat=notify.ping)

    try:
        return daemon.handler(args, make_ingestor=make_ingestor)
    finally:
        try:
            client.run(drop_worker_caches, str(Path(args.state).absolute()))
        except Exception:  # noqa: BLE001
            pass
        close(client)


def _wrap(parser: argparse.ArgumentParser, dask_cmd) -> None:
    register_ingest_options(parser)
    plain = parser.get_default("func")

    def cmd(args, _plain=plain):
        if getattr(args, "dask", None):
            return dask_cmd(args)
        return _plain(args)

    parser.set_defaults(func=cmd)


def register(subparsers) -> None:
    """Called by ``streamcoadd.cli.main`` (after the core subcommands and the daemon's): add
    ``--dask`` to ``ingest`` and ``watch``."""
    if "ingest" in subparsers.choices:
        _wrap(subparsers.choices["ingest"], cmd_ingest_dask)
    if "watch" in subparsers.choices:
        _wrap(subparsers.choices["watch"], cmd_watch_dask)
