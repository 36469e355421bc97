"""``streamcoadd status``: what a state holds, per patch and band, and its daemon's status."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from streamcoadd.analysis.reader import PatchView, open_state
from streamcoadd.cli.options import add_priority_option
from streamcoadd.store.status_file import format_status, read_status


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``status`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser("status", help="what is folded, per patch and band")
    s.add_argument("state")
    s.add_argument("--json", action="store_true")
    add_priority_option(s)
    s.set_defaults(func=cmd_status)
    return s


def status_report(st, depth: bool = True) -> dict:
    """What the state holds. Per shard (tract, patch, band): cells populated, warps, commits,
    last update and, with ``depth``, the median / max number of inputs per populated cell
    (reads each cell's contributor list only)."""
    ledger = st.store.ledger
    warps = ledger.warps()
    by_status: dict[str, int] = {}
    for w in warps:
        by_status[w.status] = by_status.get(w.status, 0) + 1
    shards = [_shard_row(st, patch, band, depth)
              for patch, band in sorted(st.store.shard_keys(), key=lambda k: (k[1], k[0]))]
    counts = [s["warps"] for s in shards]
    last = max([w.at for w in warps] + [s["updated"] for s in shards if s["updated"]],
               default=None)
    events = ledger.events()
    return {"state": str(st.root), "skymap": st.skymap.name, "warps": by_status,
            "rejected": len(ledger.rejections()), "last_activity": last,
            "shards": shards, "max_warps_per_shard": int(np.max(counts)) if counts else 0,
            "daemon": read_status(st.root), "events": [list(e) for e in events[-20:]],
            "retractions": [list(e) for e in events if e[0] == "retract"][-20:]}


def _shard_row(st, patch, band: str, depth: bool) -> dict:
    pv = PatchView(st, patch, band)
    m = pv.manifest
    n = pv.shape[0]
    row = {"tract": patch.tract, "patch": [patch.x, patch.y], "band": band,
           "cells_populated": len(m.cells) if m else 0, "cells_total": n * n,
           "warps": len(m.warps) if m else 0, "commits": m.commit if m else 0,
           "updated": m.updated if m else None}
    if depth:
        d = pv.depth_map()
        populated = d[d > 0]
        row["median_depth"] = float(np.median(populated)) if populated.size else 0.0
        row["max_depth"] = int(populated.max()) if populated.size else 0
    return row


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


def cmd_status(args: argparse.Namespace) -> int:
    """Print the report (``--json``: as JSON)."""
    with open_state(args.state) as st:
        rep = status_report(st)
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
        _print_shards(rep["shards"])
    else:
        print("no cell populated yet")
    if rep["daemon"]:
        print()
        print(format_status(rep["daemon"]))
    if rep["events"]:
        print()
        print("events (latest 20; retractions included):")
        for kind, detail, at in rep["events"]:
            print(f"  {_ago(at)}  {kind}: {detail}")
    return 0


def _print_shards(shards: list[dict]) -> None:
    with_depth = "median_depth" in shards[0]
    headers = ["band", "tract", "patch", "cells", "median depth", "max depth", "warps",
               "commits", "last update"]
    if not with_depth:
        headers = [h for h in headers if "depth" not in h]
    rows = []
    for s in shards:
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
