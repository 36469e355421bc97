"""Does a concurrent reader slow the daemon down? (docs/reliability.md, section 4)

Measures the wall time the daemon (``streamcoadd watch``) takes to fold N warps durably
while 0, 1 or 2 reader processes loop flat out over ``open_state(STATE)`` and finalize
every populated cell (``State.cell``: read the generation file, check it, compute the
coadd), as analysis code or ``streamcoadd finalize`` would.

Per run: a fresh copy of a base state that already holds one warp (so readers have cells
from the first instant), the N warps hard-linked into a fresh inbox, the readers started
and given one pass, then ``streamcoadd watch STATE --inbox INBOX --stable-seconds 0
--until-idle 1 --commit-every C``. The timed interval is the daemon's own: from its
``start`` log event to its last ``commit`` event (every warp durable and moved to done/),
so interpreter start-up and the idle wait are excluded. Configurations are interleaved
(0, 1, 2, 0, 1, 2, ...) so that a drift in the machine's load hits them alike.

Also recorded per run: the daemon's CPU time (``wait4`` rusage), the readers' cell reads,
the load average, and the machine's busy cores from ``/proc/stat`` minus what the daemon
and the readers used ("other load": jobs that are not part of the measurement).

    python3 scripts/bench_readers.py [--n 40] [--repeat 3] [--readers 0,1,2]
        [--priority auto|normal|both] [--configs 0,1:auto,1:normal,2:auto] [--small]
        [--workdir DIR] [--keep] [--json OUT]

``--priority`` is passed to the readers' ``open_state(..., priority=...)``: ``auto``
(default) lets a reader lower its own CPU/IO priority while a writer holds the state;
``normal`` opts out; ``both`` measures both. Warps: ``scripts/bench_gen.py`` (LSST patch
warps, 3400 x 3400 px, 676 cells each; ``--small`` for the demo skymap, a quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

READER = r'''
import json, os, sys, time
import streamcoadd
state, stop, out, priority = sys.argv[1:5]
reads = passes = 0
kw = {} if priority == "-" else {"priority": priority}
seen = set()  # (nice, policy) observed while reading, once the daemon runs
while not os.path.exists(stop):
    with streamcoadd.open_state(state, **kw) as st:
        for band in st.bands():
            for cid in st.populated_cells(band):
                if os.path.exists(stop):
                    break
                if st.cell(cid, band) is not None:
                    reads += 1
                if passes and reads % 50 == 0:
                    seen.add((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)))
    passes += 1
    if passes == 1:
        open(out + ".ready", "w").close()
pol = {0: "", 5: " SCHED_IDLE"}
json.dump({"reads": reads, "passes": passes,
           "nice": "/".join(f"{n}{pol.get(p, '')}" for n, p in sorted(seen)) or "-"},
          open(out, "w"))
'''


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("NOTIFY_SOCKET", None)
    return e


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise SystemExit(f"streamcoadd {' '.join(map(str, args))} failed:\n{p.stdout}{p.stderr}")
    return p


def cpu_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def wait_rusage(p: subprocess.Popen, timeout: float) -> float:
    """Wait for a child and return its CPU seconds (user + system)."""
    end = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > end:
            p.kill()
            raise SystemExit(f"pid {p.pid} did not finish in {timeout:.0f} s")
        time.sleep(0.05)


def daemon_interval(log_text: str) -> tuple[float, int]:
    """Seconds from the daemon's start event to its last commit event, and the number
    of warps the commits made durable."""
    start = last = None
    warps = 0
    for line in log_text.splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        ts = d.get("ts")
        if not ts:
            continue
        t = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float(ts[19:-1] or 0)
        if d.get("event") == "start":
            start = t
        elif d.get("event") == "commit":
            last = t
            warps += int(d.get("warps", 0))
    if start is None or last is None:
        raise SystemExit("no start/commit events in the daemon log:\n" + log_text[-3000:])
    return last - start, warps


def one_run(work: Path, base: Path, warps: list[Path], n_readers: int, priority: str,
            commit_every: int, k: int) -> dict:
    run = work / f"run{k}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir()
    state, inbox = run / "state", run / "inbox"
    shutil.copytree(base, state)
    inbox.mkdir()
    for w in warps:
        os.link(w, inbox / w.name)
    stop = run / "stop"
    readers = []
    for i in range(n_readers):
        out = run / f"reader{i}.json"
        readers.append((subprocess.Popen([sys.executable, "-c", READER, str(state), str(stop),
                                          str(out), priority], env=env(), cwd=run), out))
    for _, out in readers:  # every reader has done one full pass (imports, caches warm)
        t_end = time.monotonic() + 600
        while not Path(str(out) + ".ready").exists():
            if time.monotonic() > t_end:
                raise SystemExit("reader did not finish a pass")
            time.sleep(0.05)
    log = run / "daemon.log"
    load0 = os.getloadavg()[0]
    rc0 = sum(proc_cpu(p.pid) for p, _ in readers)
    b0, t0 = cpu_busy()
    w0 = time.monotonic()
    with open(log, "w") as lf:
        d = subprocess.Popen([sys.executable, "-m", "streamcoadd", "watch", str(state),
                              "--inbox", str(inbox), "--stable-seconds", "0",
                              "--until-idle", "1", "--idle-commit", "0.2",
                              "--commit-every", str(commit_every), "--commit-interval", "600",
                              "--log-json"], cwd=ROOT, env=env(), stdout=lf,
                             stderr=subprocess.STDOUT)
        daemon_cpu = wait_rusage(d, 3600)
    wall = time.monotonic() - w0
    b1, t1 = cpu_busy()
    readers_during = sum(proc_cpu(p.pid) for p, _ in readers) - rc0
    load1 = os.getloadavg()[0]
    stop.write_text("")
    reader_cpu, reads, nice = 0.0, 0, None
    for p, out in readers:
        reader_cpu += wait_rusage(p, 600)
        r = json.loads(out.read_text())
        reads += r["reads"]
        nice = r["nice"]
    if d.returncode != 0:
        raise SystemExit(f"daemon exited {d.returncode}:\n{log.read_text()[-3000:]}")
    seconds, durable = daemon_interval(log.read_text())
    if durable != len(warps) or any(inbox.iterdir()):
        raise SystemExit(f"only {durable} of {len(warps)} warps were made durable")
    ncpu = os.cpu_count() or 1
    busy_cores = (b1 - b0) / max(t1 - t0, 1) * ncpu
    others = busy_cores - daemon_cpu / wall - readers_during / wall
    shutil.rmtree(run)
    return {"readers": n_readers, "priority": priority, "seconds": seconds, "wall": wall,
            "daemon_cpu": daemon_cpu, "reads": reads, "reader_nice": nice,
            "load_start": load0, "load_end": load1, "busy_cores": busy_cores,
            "other_cores": others}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="warps folded per run (default 40)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--readers", default="0,1,2")
    ap.add_argument("--priority", default="auto", choices=("auto", "normal", "both", "-"),
                    help="'-': call open_state without the argument (code before it existed)")
    ap.add_argument("--configs", default=None,
                    help="instead of --readers/--priority: e.g. 0,1:auto,1:normal,2:auto")
    ap.add_argument("--commit-every", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="demo skymap warps (quick check)")
    ap.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the generated warps")
    ap.add_argument("--json", default=None, help="also write every run as JSON here")
    a = ap.parse_args(argv)

    import tempfile

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_readers_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    wdir = work / ("warps_small" if a.small else "warps") / str(a.n + 1)
    if not wdir.exists() or len(list(wdir.glob("*.fits"))) < a.n + 1:
        t = time.perf_counter()
        flag = ["--small"] if a.small else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gen.py"), str(wdir),
                        "--n", str(a.n + 1), *flag], check=True, env=env())
        print(f"generated {a.n + 1} warps in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    warps = sorted(wdir.glob("*.fits"))[: a.n + 1]
    skymap = ROOT / "config" / ("skymap-demo.toml" if a.small else "skymap-lsst.toml")
    base = work / "base"
    if base.exists():
        shutil.rmtree(base)
    cli("init", base, "--skymap", skymap)
    cli("ingest", base, warps[0], "--quiet")
    warps = warps[1:]

    prios = ("auto", "normal") if a.priority == "both" else (a.priority,)
    configs = [(int(r), p) for r in a.readers.split(",") for p in prios if int(r) or p == prios[0]]
    if a.configs:
        configs = [(int(c.split(":")[0]), (c.split(":") + [prios[0]])[1])
                   for c in a.configs.split(",")]
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "streamcoadd"],
                           capture_output=True, text=True).stdout.strip()
    print(f"# bench_readers: {a.n} warps ({'demo' if a.small else 'LSST patch'}), commit every "
          f"{a.commit_every}, {a.repeat} repeats, code {rev}{'+dirty' if dirty else ''}, "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    runs = []
    k = 0
    for rep in range(a.repeat):
        for nr, prio in configs:
            r = one_run(work, base, warps, nr, prio, a.commit_every, k)
            k += 1
            runs.append(r)
            print(f"  rep {rep} readers {nr} ({prio}): {r['seconds']:.1f} s, daemon cpu "
                  f"{r['daemon_cpu']:.1f} s, {r['reads']} reads, busy cores "
                  f"{r['busy_cores']:.2f} (others {r['other_cores']:.2f}), load {r['load_start']:.2f}", file=sys.stderr)
            if a.json:
                Path(a.json).write_text(json.dumps(runs, indent=1))
    if not a.keep and not a.workdir:
        shutil.rmtree(work)

    base_t = statistics.median(r["seconds"] for r in runs if r["readers"] == 0)
    print()
    print(f"{a.n} {'demo' if a.small else 'LSST patch'} warps per run, commit every "
          f"{a.commit_every}, {a.repeat} runs per row, {os.cpu_count()} CPUs, code "
          f"{rev}{'+dirty' if dirty else ''}")
    print()
    print("| readers | reader priority | daemon s (median) | min – max | vs 0 readers | "
          "daemon CPU s | cell reads / run | busy cores (machine) | other jobs (cores) "
          "| load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nr, prio in configs:
        rs = [r for r in runs if r["readers"] == nr and r["priority"] == prio]
        s = [r["seconds"] for r in rs]
        med = statistics.median(s)
        print(f"| {nr} | {prio if nr else '–'} (nice {rs[0]['reader_nice'] if nr else '–'}) | "
              f"{med:.1f} | {min(s):.1f} – {max(s):.1f} | {med / base_t - 1:+.1%} | "
              f"{statistics.median(r['daemon_cpu'] for r in rs):.1f} | "
              f"{statistics.median(r['reads'] for r in rs):.0f} | "
              f"{statistics.median(r['busy_cores'] for r in rs):.2f} | "
              f"{statistics.median(r['other_cores'] for r in rs):.2f} | "
              f"{statistics.median(r['load_start'] for r in rs):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
