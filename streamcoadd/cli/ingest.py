"""``streamcoadd ingest``: fold warp files into a state now, in this process or, with
``--dask ADDRESS``, on a Dask cluster."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from streamcoadd.cli.options import (
    add_dask_options,
    progress_bar,
    run_config,
    warp_files,
)
from streamcoadd.core.errors import UserError
from streamcoadd.pipeline import dask_executor
from streamcoadd.pipeline.ingest import LocalIngestor, Outcome
from streamcoadd.store.state import StateStore


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``ingest`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser("ingest", help="fold warp files into a state now")
    s.add_argument("state")
    s.add_argument("paths", nargs="+", help="warp files or directories of *.fits")
    s.add_argument("--config", help="settings TOML ([run] table)")
    s.add_argument("--commit-every", type=int, dest="commit_every",
                   help="warps folded in memory per durable commit")
    s.add_argument("--prefetch", type=int, dest="prefetch",
                   help="warps read and prepared ahead on a second thread (0: off; default 1)")
    s.add_argument("--commit-processes", type=int, dest="commit_processes",
                   help="processes writing a commit's cell files (1: no fork; default 2)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--allow-refold", action="store_true",
                   help="fold again warps that were retracted")
    add_dask_options(s)
    s.set_defaults(func=cmd_ingest)
    return s


def cmd_ingest(args: argparse.Namespace) -> int:
    """Exit 0 when every file was folded or already present, 1 when some were rejected
    (or failed on Dask)."""
    if args.dask:
        return _ingest_dask(args)
    return _ingest_local(args)


def _ingest_local(args: argparse.Namespace) -> int:
    files = warp_files(args.paths)
    counts = {"folded": 0, "no_cells": 0, "duplicate": 0, "rejected": 0}
    rejected = []
    t0 = time.perf_counter()
    with StateStore.open(args.state, write=True) as store:
        ing = LocalIngestor(store, run_config(args), allow_refold=args.allow_refold)
        bar = progress_bar(len(files), args.quiet)
        try:
            for i, f in enumerate(files):
                # the next file is read and prepared on a second core while f folds
                o = ing.submit(f, then=files[i + 1] if i + 1 < len(files) else None)
                if o.status in ("duplicate", "rejected"):
                    counts[str(o.status)] += 1
                if o.status == "rejected":
                    rejected.append(o)
                bar.update(1)
                bar.set_postfix_str(f"{f.name}: {o.status}")
                if ing.needs_commit():
                    for d in ing.commit():
                        counts[str(d.status)] += 1
            for d in ing.commit():
                counts[str(d.status)] += 1
        finally:
            ing.close()
            bar.close()
    dt = time.perf_counter() - t0
    print(f"{len(files)} file(s) in {dt:.1f} s: {counts['folded']} folded, "
          f"{counts['no_cells']} valid but covering no cell, {counts['duplicate']} already "
          f"present, {counts['rejected']} rejected")
    for o in rejected:
        print(f"  rejected {o.path}: {o.reason}")
    return 1 if rejected else 0


def _ingest_dask(args: argparse.Namespace) -> int:
    files = warp_files(args.paths)
    rc = run_config(args)
    if args.dask_batch is not None and args.dask_batch < 1:
        raise UserError("--dask-batch must be >= 1")
    counts = {"folded": 0, "no_cells": 0, "duplicate": 0, "rejected": 0, "failed": 0}
    bad: list[Outcome] = []
    t0 = time.perf_counter()
    bar = progress_bar(len(files), args.quiet)

    def progress(o: Outcome) -> None:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
        if o.status in ("rejected", "failed"):
            bad.append(o)
        bar.update(1)
        bar.set_postfix_str(f"{Path(o.path).name}: {o.status}")

    try:
        run = dask_executor.run_distributed(
            args.state, files, args.dask, rc, batch=args.dask_batch,
            retries=args.dask_retries, progress=progress, allow_refold=args.allow_refold)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    print(f"{len(files)} file(s) in {dt:.1f} s on Dask ({len(run.stats.workers)} "
          f"worker process(es), {run.stats.tasks} shard task(s)): {counts['folded']} "
          f"folded, {counts['no_cells']} valid but covering no cell, {counts['duplicate']} "
          f"already present, {counts['rejected']} rejected, {counts['failed']} failed")
    _print_grouped(bad)
    return 1 if bad else 0


def _print_grouped(bad: list[Outcome]) -> None:
    """One line per (status, reason): the first three files of each group by name."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for o in bad:
        by_reason.setdefault((str(o.status), o.reason), []).append(o.path)
    for (status, reason), paths in by_reason.items():
        if len(paths) == 1:
            print(f"  {status} {paths[0]}: {reason}")
        else:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            print(f"  {status} {len(paths)} files ({', '.join(paths[:3])}{more}): {reason}")
