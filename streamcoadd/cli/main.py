"""The ``streamcoadd`` command line. No science here: it parses, calls, and reports.

User mistakes (``UserError``) print one line and exit 2; nothing prints a traceback
unless ``STREAMCOADD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from streamcoadd.cli import dask_options
from streamcoadd.cli import plot as cli_plot
from streamcoadd.cli import simulate as cli_simulate
from streamcoadd.cli import verify as cli_verify
from streamcoadd.cli import watch as cli_watch
from streamcoadd.cli.options import parse_pair
from streamcoadd.core.config import FoldConfig, RunConfig, site_config
from streamcoadd.core.errors import NoWorkFound, UserError
from streamcoadd.core.skymap import load_skymap
from streamcoadd.core.version import __version__
from streamcoadd.pipeline.memory import retain_freed_memory


def run_config(args) -> RunConfig:
    d = dict(site_config(getattr(args, "config", None)).get("run", {}))
    for key in ("commit_every", "commit_interval", "cache_gb", "prefetch", "commit_processes"):
        v = getattr(args, key, None)
        if v is not None:
            d[key] = v
    return RunConfig.from_dict(d)


# ---------------------------------------------------------------------- init
def cmd_init(args) -> int:
    from streamcoadd.store.state import StateStore

    skymap = load_skymap(args.skymap)
    fold = FoldConfig.from_dict(site_config(args.config).get("fold", {}))
    StateStore.create(args.state, skymap, fold)
    ntr = len(skymap.tracts)
    print(f"created state {args.state} (skymap {skymap.name!r}, {ntr} tract(s), "
          f"{skymap.cells.cells_per_patch}x{skymap.cells.cells_per_patch} cells per patch)")
    return 0


# ---------------------------------------------------------------------- ingest
def warp_files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.name.endswith(".fits") and f.is_file())
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    if not out:
        raise NoWorkFound(f"no *.fits files found in {' '.join(paths)}")
    return out


def progress_bar(total: int, quiet: bool):
    try:
        if quiet:
            raise ImportError
        from tqdm import tqdm

        return tqdm(total=total, unit="warp", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class _Plain:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Plain()


def cmd_ingest(args) -> int:
    from streamcoadd.pipeline.ingest import Ingestor
    from streamcoadd.store.state import StateStore

    files = warp_files(args.paths)
    counts = {"folded": 0, "no_cells": 0, "duplicate": 0, "rejected": 0}
    rejected = []
    t0 = time.perf_counter()
    with StateStore.open(args.state, write=True) as store:
        ing = Ingestor(store, run_config(args), allow_refold=args.allow_refold)
        bar = progress_bar(len(files), args.quiet)
        try:
            for i, f in enumerate(files):
                # the next file is read and prepared on a second core while f folds
                o = ing.submit(f, then=files[i + 1] if i + 1 < len(files) else None)
                if o.status in ("duplicate", "rejected"):
                    counts[o.status] += 1
                if o.status == "rejected":
                    rejected.append(o)
                bar.update(1)
                bar.set_postfix_str(f"{f.name}: {o.status}")
                if ing.needs_commit():
                    for d in ing.commit():
                        counts[d.status] += 1
            for d in ing.commit():
                counts[d.status] += 1
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


def cmd_retract(args) -> int:
    from streamcoadd.pipeline.retract import retract
    from streamcoadd.store.state import StateStore

    with StateStore.open(args.state, write=True) as store:
        rep = retract(store, args.visit, args.detector, args.tract, args.reason,
                      args.file, args.search)
    for r in rep.warps:
        print(f"retracted visit {r.visit} detector {r.detector} (tract {r.tract}, band {r.band})")
    print(f"{len(rep.warps)} warp(s) retracted from {rep.cells} cell(s)")
    return 0


# ---------------------------------------------------------------------- finalize
def cmd_finalize(args) -> int:
    from streamcoadd.analysis.finalize import file_stem, finalize_patch
    from streamcoadd.analysis.reader import open_state

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_state(args.state) as st:
        bands = [args.band] if args.band else st.bands()
        written = 0
        for band in bands:
            for patch in st.patches(band):
                if args.tract is not None and patch.tract != args.tract:
                    continue
                if args.patch and (patch.x, patch.y) != tuple(args.patch):
                    continue
                cells = st.populated_cells(band, patch)
                if args.cell:
                    cells = [c for c in cells if (c.x, c.y) == tuple(args.cell)]
                if not cells:
                    continue
                stem = out / file_stem(patch, band)
                n = finalize_patch(st.store, st.skymap.name, patch, band, cells, stem,
                                   stitched=not args.cell, workers=args.workers)
                if not n:
                    continue
                print(f"{patch} band {band}: {n} cell(s) -> {stem.name}_*.fits")
                written += n
    if not written:
        raise NoWorkFound("no populated cell matches the selection; nothing finalized "
                          "(ingest warps first, or check --tract/--patch/--cell/--band)")
    return 0


# ---------------------------------------------------------------------- status
def status_report(st, depth: bool = True) -> dict:
    """What the state holds. Per shard (tract, patch, band): cells populated, warps, commits,
    last update and, with ``depth``, the median / max number of inputs per populated cell
    (reads each cell's contributor list only)."""
    import numpy as np

    from streamcoadd.analysis.reader import PatchView

    ledger = st.store.ledger
    warps = ledger.warps()
    by_status = {}
    for w in warps:
        by_status[w.status] = by_status.get(w.status, 0) + 1
    shards = []
    for patch, band in sorted(st.store.shard_keys(), key=lambda k: (k[1], k[0])):
        pv = PatchView(st, patch, band)
        m = pv.manifest
        n = pv.shape[0]
        row = {"tract": patch.tract, "patch": [patch.x, patch.y], "band": band,
               "cells_populated": len(m["cells"]), "cells_total": n * n,
               "warps": len(m["warps"]), "commits": m.get("commit", 0),
               "updated": m.get("updated")}
        if depth:
            d = pv.depth_map()
            populated = d[d > 0]
            row["median_depth"] = float(np.median(populated)) if populated.size else 0.0
            row["max_depth"] = int(populated.max()) if populated.size else 0
        shards.append(row)
    counts = [s["warps"] for s in shards]
    from streamcoadd.store.status_file import read_status

    daemon = read_status(st.root)
    last = max([w.at for w in warps] + [s["updated"] for s in shards if s["updated"]],
               default=None)
    events = ledger.events()
    return {"state": str(st.root), "skymap": st.skymap.name, "warps": by_status,
            "rejected": len(ledger.rejections()), "last_activity": last,
            "shards": shards, "max_warps_per_shard": int(np.max(counts)) if counts else 0,
            "daemon": daemon, "events": [list(e) for e in events[-20:]],
            "retractions": [list(e) for e in events if e[0] == "retract"][-20:]}


def _ago(t) -> str:
    if t is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _age(t, now=None) -> str:
    """'12 s ago', '5 min ago', '3.2 h ago', '4 d ago'."""
    if t is None:
        return ""
    dt = max(0.0, (now or time.time()) - t)
    if dt < 90:
        return f"{dt:.0f} s ago"
    if dt < 5400:
        return f"{dt / 60:.0f} min ago"
    if dt < 36 * 3600:
        return f"{dt / 3600:.1f} h ago"
    return f"{dt / 86400:.0f} d ago"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def cmd_status(args) -> int:
    from streamcoadd.analysis.reader import open_state

    with open_state(args.state) as st:
        rep = status_report(st, depth=not getattr(args, "no_depth", False))
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    w = rep["warps"]
    print(f"state {rep['state']}  (skymap {rep['skymap']})")
    print(f"warps: {w.get('folded', 0)} folded, {w.get('no_cells', 0)} covering no cell, "
          f"{w.get('retracted', 0)} retracted; {rep['rejected']} rejection(s) logged; "
          f"last activity {_ago(rep['last_activity'])}"
          + (f" ({_age(rep['last_activity'])})" if rep["last_activity"] else ""))
    if rep["shards"]:
        with_depth = "median_depth" in rep["shards"][0]
        headers = ["band", "tract", "patch", "cells", "median depth", "max depth", "warps",
                   "commits", "last update"]
        if not with_depth:
            headers = [h for h in headers if "depth" not in h]
        rows = []
        for s in rep["shards"]:
            r = [s["band"], str(s["tract"]), f"{s['patch'][0]},{s['patch'][1]}",
                 f"{s['cells_populated']}/{s['cells_total']}"]
            if with_depth:
                r += [f"{s['median_depth']:g}", str(s["max_depth"])]
            r += [str(s["warps"]), str(s["commits"]),
                  f"{_ago(s['updated'])} ({_age(s['updated'])})" if s["updated"] else "never"]
            rows.append(r)
        print()
        right = {1, 3, 4, 5, 6, 7} if with_depth else {1, 3, 4, 5}
        for line in _table(headers, rows, right):
            print(line)
        if with_depth:
            print("(depth = inputs per populated cell, in the group that makes the coadd)")
    else:
        print("no cell populated yet")
    if rep["daemon"]:
        from streamcoadd.service.daemon import format_status

        print()
        print(format_status(rep["daemon"]))
    if rep["events"]:
        print()
        print("events (latest 20; retractions included):")
        for kind, detail, at in rep["events"]:
            print(f"  {_ago(at)}  {kind}: {detail}")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamcoadd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"streamcoadd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a state from a skymap")
    s.add_argument("state")
    s.add_argument("--skymap", required=True, help="skymap TOML (see config/)")
    s.add_argument("--config", help="settings TOML whose [fold] table fixes the fold rules")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("ingest", help="fold warp files into a state now")
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
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("retract", help="remove a visit's contribution from every cell")
    s.add_argument("state")
    s.add_argument("--visit", type=int, required=True)
    s.add_argument("--detector", type=int)
    s.add_argument("--tract", type=int)
    s.add_argument("--reason", default="", help="logged in the state (status shows it)")
    s.add_argument("--file", action="append", default=[],
                   help="the warp file, if it is no longer where it was folded from")
    s.add_argument("--search", action="append", default=[],
                   help="directory to look for the warp file in (e.g. done/)")
    s.set_defaults(func=cmd_retract)

    s = sub.add_parser("finalize", help="write coadd FITS files from the state")
    s.add_argument("state")
    s.add_argument("--out", required=True)
    s.add_argument("--tract", type=int)
    s.add_argument("--patch", type=parse_pair, help="X,Y")
    s.add_argument("--cell", type=parse_pair, help="X,Y (one cell; with --patch)")
    s.add_argument("--band")
    s.add_argument("--workers", type=int,
                   help="processes finalizing cells in parallel (default: cores, at most 4)")
    s.set_defaults(func=cmd_finalize)

    s = sub.add_parser("status", help="what is folded, per patch and band")
    s.add_argument("state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    for mod in (cli_simulate, cli_watch, cli_verify, cli_plot, dask_options):
        mod.register(sub)
    # read-only commands: yield to a running writer (docs/reliability.md, readers)
    for name in ("finalize", "status", "plot", "verify"):
        s = sub.choices.get(name)
        if s is not None:
            s.add_argument("--priority", choices=("auto", "low", "normal"), default="auto",
                           help="auto (default): run at the lowest CPU and I/O priority "
                                "while a writer (the daemon) holds the state, so reading "
                                "never slows it down; normal: do not; low: always lower")
    return p


def main(argv=None) -> int:
    # Before any thread exists: a thread that allocates first gets its own malloc arena,
    # and later threads (the warp loader) may share it, outside the tuning.
    retain_freed_memory()
    args = build_parser().parse_args(argv)
    if getattr(args, "cell", None) and not getattr(args, "patch", None):
        print("streamcoadd: error: --cell needs --patch", file=sys.stderr)
        return 2
    try:
        if getattr(args, "priority", None) and not getattr(args, "repair", False):
            from streamcoadd.analysis.reader import (
                lower_priority_for,
                set_default_priority,
            )

            set_default_priority(args.priority)
            lower_priority_for(args.state, args.priority)  # for the whole command
        return int(args.func(args) or 0)
    except NoWorkFound as e:
        print(f"streamcoadd: nothing to do: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"streamcoadd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamcoadd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("STREAMCOADD_DEBUG"):
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # disk full anywhere else (the lock file, ...): a message, not a traceback
            from streamcoadd.core.errors import write_error_message

            print(f"streamcoadd: error: {write_error_message(e.filename or 'the state', e)}",
                  file=sys.stderr)
            return 2
        import traceback

        print("streamcoadd: internal error (a bug; please report it with this trace):",
              file=sys.stderr)
        traceback.print_exc()
        return 70
