"""Daemon latency for the benchmark: time from a warp being renamed into the inbox to the
daemon moving it to ``done/`` (which it does only after the commit that made it durable).

Starts ``streamcoadd watch STATE --inbox INBOX --until-idle S`` on a fresh state, then
delivers warps the way producers should (hard link as ``.NAME.tmp`` in the inbox, then
rename to ``NAME.fits``): first one warp alone (isolated latency), then a stream of K
warps ``--gap`` seconds apart. Polls ``done/`` every 20 ms.

    python3 scripts/bench_daemon.py STATE WARP... --json J [--gap 3] [--pythonpath SRC]

``--pythonpath`` runs the daemon from another source tree (e.g. the daemon branch before
it is merged); the default is this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def has_watch(pythonpath: str) -> bool:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    r = subprocess.run([sys.executable, "-m", "streamcoadd", "watch", "--help"],
                       capture_output=True, env=env, cwd=pythonpath)  # -m puts cwd first
    return r.returncode == 0


def deliver(src: Path, inbox: Path) -> float:
    tmp = inbox / f".{src.name}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    t = time.time()
    os.rename(tmp, inbox / src.name)
    return t


def wait_done(done: Path, names: set[str], landed: dict, out: dict, timeout: float,
              proc=None):
    end = time.time() + timeout
    while names and time.time() < end:
        for n in list(names):
            if (done / n).exists():
                out[n] = time.time() - landed[n]
                names.discard(n)
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state")
    ap.add_argument("warps", nargs="+")
    ap.add_argument("--json", required=True)
    ap.add_argument("--gap", type=float, default=3.0)
    ap.add_argument("--until-idle", type=float, default=5.0)
    ap.add_argument("--pythonpath", default=str(ROOT))
    ap.add_argument("--skymap", default=str(ROOT / "config" / "skymap-lsst.toml"))
    a = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=a.pythonpath)
    res = dict(pythonpath=a.pythonpath)
    if not has_watch(a.pythonpath):
        res["skipped"] = "no 'streamcoadd watch' in this source tree"
        Path(a.json).write_text(json.dumps(res))
        return 0
    state = Path(a.state).absolute()
    base = state.parent / (state.name + "-daemon")
    inbox, done = base / "inbox", base / "done"
    for d in (inbox, done):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "streamcoadd", "init", str(state), "--skymap",
                    str(Path(a.skymap).absolute())], check=True, env=env, capture_output=True,
                   cwd=a.pythonpath)
    log = open(base / "daemon.log", "w")
    t_start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "streamcoadd", "watch", str(state),
                             "--inbox", str(inbox), "--until-idle", str(a.until_idle)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=a.pythonpath)
    status = state / "daemon-status.json"
    while not status.exists() and proc.poll() is None and time.time() - t_start < 60:
        time.sleep(0.05)
    res["startup_s"] = time.time() - t_start
    warps = [Path(w).absolute() for w in a.warps]
    landed, lat = {}, {}
    # 1. one warp alone
    first = warps[0]
    landed[first.name] = deliver(first, inbox)
    wait_done(done, {first.name}, landed, lat, 600, proc)
    res["isolated_s"] = lat.get(first.name)
    # 2. a stream
    stream = {}
    for w in warps[1:]:
        landed[w.name] = deliver(w, inbox)
        t_next = time.time() + a.gap
        wait_done(done, {w.name}, landed, stream, max(0.0, t_next - time.time()), proc)
    pending = {w.name for w in warps[1:]} - set(stream)
    wait_done(done, pending, landed, stream, 900, proc)
    res["stream_gap_s"] = a.gap
    res["stream_latencies_s"] = [stream.get(w.name) for w in warps[1:]]
    pid, st, ru = os.wait4(proc.pid, 0)
    res["exit"] = os.waitstatus_to_exitcode(st)
    res["maxrss_mb"] = ru.ru_maxrss / 1024
    log.close()
    res["log_tail"] = (base / "daemon.log").read_text()[-3000:]
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
