"""Run ``streamcoadd ingest`` (the real CLI code path, default settings) with timers on
every ``LocalIngestor.submit`` (the fold of one warp, in memory) and ``LocalIngestor.commit`` (the
durable write of every pending warp), and an RSS sampler.

    python3 scripts/bench_ingest.py STATE WARPDIR --json out.json [-- extra ingest args]

The wrappers only read ``time.perf_counter()`` around the original methods, so the
numbers are those of ``python3 -m streamcoadd ingest STATE WARPDIR --quiet``.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamcoadd.cli.main import main as cli  # noqa: E402
from streamcoadd.pipeline.ingest import LocalIngestor  # noqa: E402
from streamcoadd.pipeline.memory import retain_freed_memory  # noqa: E402

events: list[dict] = []
T0 = time.perf_counter()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.trace = []

    def run(self):
        while True:
            r = rss_mb()
            self.peak = max(self.peak, r)
            self.trace.append((round(time.perf_counter() - T0, 2), round(r)))
            time.sleep(0.1)


_submit, _commit = LocalIngestor.submit, LocalIngestor.commit


def submit(self, path, then=None):
    t = time.perf_counter()
    o = _submit(self, path, then)
    events.append(dict(kind="submit", path=str(path), status=o.status, cells=o.cells,
                       t=t - T0, dt=time.perf_counter() - t, rss_mb=rss_mb(),
                       dirty_gb=self.store.dirty_bytes() / 1e9))
    return o


def commit(self):
    n = self.pending
    t = time.perf_counter()
    out = _commit(self)
    if n:
        events.append(dict(kind="commit", n=n, t=t - T0, dt=time.perf_counter() - t,
                           rss_mb=rss_mb()))
    return out


LocalIngestor.submit, LocalIngestor.commit = submit, commit


def main():
    args = sys.argv[1:]
    out = args[args.index("--json") + 1]
    rest = [a for i, a in enumerate(args) if a != "--json" and (i == 0 or args[i - 1] != "--json")]
    state, *paths = [a for a in rest if a != "--"]
    retain_freed_memory()  # what cli.main does first, here before the sampler thread exists
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    rc = cli(["ingest", state, *paths, "--quiet"])
    wall = time.perf_counter() - t
    Path(out).write_text(json.dumps(dict(rc=rc, wall_s=wall, import_s=t - T_START,
                                         e2e_s=time.perf_counter() - T_START, events=events,
                                         sampled_peak_rss_mb=sampler.peak,
                                         rss_trace=sampler.trace[::5]), indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
