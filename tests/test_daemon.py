"""The daemon (`streamcoadd watch`): real subprocesses, real files, real signals.

Warps are tiny (50x50 px, one demo-skymap cell each) so that 1,000 of them fold in seconds.
Every test checks through the reader API that each warp was folded exactly once.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import streamcoadd
from streamcoadd.core.skymap import load_skymap
from streamcoadd.io.warp_writer import write_warp

REPO = Path(__file__).resolve().parent.parent
SKYMAP = REPO / "config" / "skymap-demo.toml"
# cell (i, j) of patch 0,0 has its inner box at x from -50 + 50 i (50 px): a warp on
# [x0, x0+50) x [y0, y0+50) covers exactly one cell.
ORIGINS = [(0, 0), (50, 0), (0, 50), (50, 50)]
N = 50


# --------------------------------------------------------------------------- helpers
def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("NOTIFY_SOCKET", None)
    return e


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=REPO,
                          env=env(), capture_output=True, text=True, **kw)


def make_state(tmp: Path) -> Path:
    from streamcoadd.core.config import FoldConfig
    from streamcoadd.store.state import StateStore

    state = tmp / "state"
    StateStore.create(state, load_skymap(SKYMAP), FoldConfig())
    return state


class Daemon:
    """`streamcoadd watch` in a subprocess; stderr (the log) goes to a file."""

    def __init__(self, state: Path, inbox: Path, *args, log: Path | None = None,
                 extra_env: dict | None = None):
        self.log = log or inbox.parent / f"daemon-{time.monotonic_ns()}.log"
        self._f = open(self.log, "w")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "streamcoadd", "watch", str(state), "--inbox", str(inbox),
             *map(str, args)], cwd=REPO, env={**env(), **(extra_env or {})}, stdout=self._f,
            stderr=subprocess.STDOUT)
        self.status_file = state / "daemon-status.json"

    def status(self) -> dict | None:
        try:
            d = json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return d if d.get("pid") == self.p.pid else None

    def wait_running(self, timeout=20):
        wait_for(lambda: (s := self.status()) and s["state"] in ("running", "idle"), timeout,
                 lambda: f"daemon did not start; log:\n{self.text()}")

    def wait(self, timeout=60) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self._f.flush()

    def signal(self, sig):
        self.p.send_signal(sig)

    def text(self) -> str:
        self._f.flush()
        return self.log.read_text()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self._f.close()


@pytest.fixture
def daemons():
    started = []

    def start(*a, **kw):
        d = Daemon(*a, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def wait_for(cond, timeout, msg="condition not met"):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(msg() if callable(msg) else msg)


_PSF = None


def psf():
    global _PSF
    if _PSF is None:
        y, x = np.mgrid[-5:6, -5:6]
        p = np.exp(-(x ** 2 + y ** 2) / 4.0)
        _PSF = p / p.sum()
    return _PSF


def warp_bytes(visit: int, detector: int = 1, band: str = "r", origin=None,
               seed=None) -> bytes:
    """A valid tiny warp as bytes (written once per origin, then the VISIT / DETECTOR cards
    are patched: fast enough for thousands)."""
    origin = ORIGINS[visit % len(ORIGINS)] if origin is None else origin
    key = (origin, band, seed)
    if key not in _TEMPLATES:
        tract = load_skymap(SKYMAP).tract(0)
        rng = np.random.default_rng(seed if seed is not None else hash(origin) % 1000)
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tpl-{os.getpid()}-{len(_TEMPLATES)}.fits"
        write_warp(tmp, tract=tract, xy0=origin, image=rng.normal(10, 1, (N, N)),
                   mask=np.zeros((N, N), np.int32), variance=np.ones((N, N)), psf=psf(),
                   visit=0, detector=0, band=band, atomic=False)
        _TEMPLATES[key] = tmp.read_bytes()
        tmp.unlink()
    b = bytearray(_TEMPLATES[key])
    for k, v in (("VISIT", visit), ("DETECTOR", detector)):
        i = b.index(f"{k:<8}= ".encode(), 0, 2880)
        b[i:i + 30] = f"{k:<8}= {v:>20}".encode()
    return bytes(b)


_TEMPLATES: dict = {}


def put(inbox: Path, name: str, data: bytes, staging: Path | None = None) -> Path:
    """Deliver by the rename convention: write NAME.tmp (or into staging/), then rename."""
    tmp = (staging / name) if staging else inbox / (name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, inbox / name)
    return inbox / name


def contributors(state: Path, band: str = "r") -> collections.Counter:
    """(visit, detector) -> number of cells it contributes to, from the state."""
    c = collections.Counter()
    with streamcoadd.open_state(state) as st:
        if band not in st.bands():
            return c
        for cell in st.populated_cells(band):
            t = st.cell(cell, band).contributors
            for v, d in zip(t["visit"], t["detector"]):
                c[(int(v), int(d))] += 1
    return c


def assert_once(state: Path, expected: set, band: str = "r"):
    got = contributors(state, band)
    assert set(got) == expected, (sorted(set(got) - expected)[:10],
                                  sorted(expected - set(got))[:10])
    twice = {k: n for k, n in got.items() if n != 1}
    assert not twice, f"folded more than once: {list(twice.items())[:10]}"


@pytest.fixture
def area(tmp_path):
    state = make_state(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return state, inbox, tmp_path


FAST = ("--stable-seconds", "0.5", "--reconcile", "2")


# --------------------------------------------------------------------------- tests
def test_present_at_start_until_idle(area, daemons):
    state, inbox, tmp = area
    for v in range(12):
        (inbox / f"w{v:03d}.fits").write_bytes(warp_bytes(v))
    (inbox / "notes.txt").write_text("not a warp")
    (inbox / "partial.fits.tmp").write_bytes(b"half a warp")
    (inbox / "tmp").mkdir()
    (inbox / "tmp" / "later.fits").write_bytes(warp_bytes(99))
    d = daemons(state, inbox, *FAST, "--until-idle", "1.5", "--commit-every", "5")
    assert d.wait(60) == 0, d.text()
    done = tmp / "done"
    assert sorted(p.name for p in done.iterdir()) == [f"w{v:03d}.fits" for v in range(12)]
    # files not following the conventions are left alone
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.txt", "partial.fits.tmp", "tmp"]
    assert (inbox / "tmp" / "later.fits").exists()
    assert_once(state, {(v, 1) for v in range(12)})
    log = d.text()
    assert log.count(" warp ") == 12 and "outcome=folded" in log
    assert "file=w003.fits visit=3 detector=1 band=r cells=1 ms=" in log
    st = json.loads((state / "daemon-status.json").read_text())
    assert st["state"] == "stopped" and st["counts"]["folded"] == 12
    assert st["counts"]["commits"] >= 3 and st["pending"] == 0
    # the CLI's status shows the daemon block
    r = cli("status", state)
    assert r.returncode == 0 and "daemon" in r.stdout


def test_arrivals_while_running_slow_writer_and_rejects(area, daemons):
    state, inbox, tmp = area
    d = daemons(state, inbox, "--stable-seconds", "1.0", "--reconcile", "30",
                "--commit-every", "4", "--commit-interval", "1")
    d.wait_running()
    # rename convention: NAME.tmp in the inbox, or a tmp/ folder inside it, or a staging dir
    put(inbox, "a.fits", warp_bytes(1))
    put(inbox, "b.fits", warp_bytes(2), staging=inbox / "tmp")
    put(inbox, "c.fits", warp_bytes(3), staging=tmp / "staging")
    wait_for(lambda: (tmp / "done" / "c.fits").exists(), 15, lambda: d.text())

    # a file written slowly in place (no convention): pauses shorter than stable-seconds
    data = warp_bytes(4)
    slow = inbox / "slow.fits"
    with open(slow, "wb") as f:
        chunks = [data[i:i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
        for ch in chunks:
            f.write(ch)
            f.flush()
            time.sleep(0.4)
            assert not (tmp / "rejected" / "slow.fits").exists(), "taken before complete"
            assert slow.exists(), "taken before complete"
    wait_for(lambda: (tmp / "done" / "slow.fits").exists(), 15, lambda: d.text())

    # rejected files, each with a reason
    put(inbox, "garbage.fits", b"SIMPLE  = not really a FITS file" * 50)
    put(inbox, "truncated.fits", warp_bytes(5)[:9000])
    put(inbox, "conflict.fits", warp_bytes(1, seed=7))  # visit 1 again, other content
    # a duplicate (same content as a.fits under another name) goes to done/ unfolded
    put(inbox, "a-again.fits", warp_bytes(1))
    rej = tmp / "rejected"
    wait_for(lambda: all((rej / n).exists() for n in
                         ("garbage.fits", "truncated.fits", "conflict.fits"))
             and (tmp / "done" / "a-again.fits").exists(), 20, lambda: d.text())
    for n in ("garbage.fits", "truncated.fits", "conflict.fits"):
        reason = (rej / (n + ".reason")).read_text()
        assert reason.strip() and "file: " + n in reason, reason
    assert "different content" in (rej / "conflict.fits.reason").read_text()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.text()
    assert not any(p.is_file() for p in inbox.iterdir())
    assert_once(state, {(v, 1) for v in (1, 2, 3, 4)})
    log = d.text()
    assert "file=a-again.fits visit=1 detector=1 band=r" in log and "outcome=duplicate" in log
    assert log.count("outcome=rejected") == 3
    st = json.loads((state / "daemon-status.json").read_text())
    assert (st["counts"]["folded"], st["counts"]["duplicate"], st["counts"]["rejected"]) == (4, 1, 3)


def test_burst_of_1000(area, daemons):
    state, inbox, tmp = area
    cfg = tmp / "settings.toml"
    # a small tracking bound: the daemon must work through a backlog bigger than it tracks
    cfg.write_text("[daemon]\nmax_tracked = 150\n[run]\ncommit_every = 64\n")
    staging = tmp / "staging"
    staging.mkdir()
    n = 1000
    for v in range(n):
        (staging / f"b{v:04d}.fits").write_bytes(warp_bytes(v, detector=v % 7))
    d = daemons(state, inbox, "--config", cfg, *FAST, "--until-idle", "2")
    d.wait_running()
    t0 = time.monotonic()
    for v in range(n):
        os.rename(staging / f"b{v:04d}.fits", inbox / f"b{v:04d}.fits")
    assert d.wait(90) == 0, d.text()[-3000:]
    dt = time.monotonic() - t0
    assert len(list((tmp / "done").iterdir())) == n
    assert not list(inbox.iterdir())
    assert_once(state, {(v, v % 7) for v in range(n)})
    st = json.loads((state / "daemon-status.json").read_text())
    assert st["counts"]["folded"] == n
    assert st["queue"]["in_inbox"] == 0
    print(f"1000 warps in {dt:.1f} s ({n / dt:.0f} warps/s)")


def test_polling_mode(area, daemons):
    state, inbox, tmp = area
    (inbox / "w0.fits").write_bytes(warp_bytes(0))
    d = daemons(state, inbox, "--poll", "0.3", *FAST, "--commit-interval", "0.5")
    d.wait_running()
    assert d.status()["observer"]["kind"].startswith("polling")
    for v in range(1, 6):
        put(inbox, f"w{v}.fits", warp_bytes(v))
    wait_for(lambda: len(list((tmp / "done").glob("*.fits"))) == 6, 20, lambda: d.text())
    d.signal(signal.SIGINT)
    assert d.wait(30) == 0, d.text()
    assert_once(state, {(v, 1) for v in range(6)})


def test_second_daemon_refused(area, daemons):
    state, inbox, tmp = area
    a = daemons(state, inbox, *FAST)
    a.wait_running()
    before = a.status()
    b = subprocess.run([sys.executable, "-m", "streamcoadd", "watch", str(state), "--inbox",
                        str(inbox)], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=30)
    assert b.returncode != 0
    lines = [ln for ln in b.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "in use by" in lines[0] and f"pid {a.p.pid}" in lines[0], b.stderr
    assert "Traceback" not in b.stderr
    # the running daemon and its status file are untouched
    assert a.p.poll() is None and a.status()["started"] == before["started"]
    put(inbox, "w.fits", warp_bytes(3))
    wait_for(lambda: (tmp / "done" / "w.fits").exists(), 15, lambda: a.text())
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stop_mid_stream_then_restart(area, daemons, sig):
    state, inbox, tmp = area
    n = 300
    expected = {(v, 2) for v in range(n)}
    d = daemons(state, inbox, *FAST, "--commit-every", "8")
    d.wait_running()
    stop = threading.Event()

    def feed():
        for v in range(n):
            if stop.is_set():
                return
            put(inbox, f"s{v:04d}.fits", warp_bytes(v, detector=2))
            time.sleep(0.002)

    th = threading.Thread(target=feed)
    th.start()
    wait_for(lambda: (s := d.status()) and s["counts"]["folded"] >= 40, 60, lambda: d.text())
    d.signal(sig)
    rc = d.wait(30)
    th.join()
    assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), d.text()
    left = list(inbox.glob("*.fits"))
    assert left, "stopped too late to test anything"
    if sig == signal.SIGTERM:
        assert "reason=signal signal=SIGTERM" in d.text()
        st = json.loads((state / "daemon-status.json").read_text())
        assert st["state"] == "stopped" and st["pending"] == 0
    # what left the inbox is durable
    done_now = {int(p.name[1:5]) for p in (tmp / "done").glob("*.fits")}
    got = contributors(state)
    assert {(v, 2) for v in done_now} <= set(got)
    # restart: everything still in the inbox is folded, nothing twice
    d2 = daemons(state, inbox, *FAST, "--until-idle", "1.5")
    assert d2.wait(90) == 0, d2.text()
    assert not list(inbox.glob("*.fits"))
    assert len(list((tmp / "done").glob("*.fits"))) == n
    assert_once(state, expected)


def test_sigterm_commits_pending_batch(area, daemons):
    """With a long commit interval the batch is only in memory when SIGTERM arrives: the
    daemon commits it before exiting (on_stop = commit) ..."""
    state, inbox, tmp = area
    d = daemons(state, inbox, *FAST, "--commit-every", "100", "--commit-interval", "600",
                "--idle-commit", "600")
    d.wait_running()
    for v in range(5):
        put(inbox, f"p{v}.fits", warp_bytes(v))
    # wait until folded in memory (nothing can be done/ yet)
    wait_for(lambda: (s := d.status()) and s["pending"] == 5, 15, lambda: d.text())
    assert not (tmp / "done").exists() or not list((tmp / "done").iterdir())
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.text()
    assert len(list((tmp / "done").iterdir())) == 5
    assert_once(state, {(v, 1) for v in range(5)})


def test_abandon_on_stop_leaves_inbox(area, daemons):
    """... or, with --on-stop abandon, leaves it in the inbox for the next run."""
    state, inbox, tmp = area
    d = daemons(state, inbox, *FAST, "--commit-every", "100", "--commit-interval", "600",
                "--idle-commit", "600", "--on-stop", "abandon")
    d.wait_running()
    for v in range(3):
        put(inbox, f"p{v}.fits", warp_bytes(v))
    wait_for(lambda: (s := d.status()) and s["pending"] == 3, 15, lambda: d.text())
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.text()
    assert len(list(inbox.glob("*.fits"))) == 3
    assert contributors(state) == collections.Counter()
    d2 = daemons(state, inbox, *FAST, "--until-idle", "1", "--delete-done")
    assert d2.wait(30) == 0, d2.text()
    assert not list(inbox.glob("*.fits")) and not list((tmp / "done").glob("*.fits"))
    assert_once(state, {(v, 1) for v in range(3)})


def test_bad_arguments_one_line(tmp_path):
    r = cli("watch", tmp_path / "nostate", "--inbox", tmp_path / "in")
    assert r.returncode == 2 and "no streamcoadd state" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("watch", tmp_path / "nostate")
    assert r.returncode == 2 and "--inbox" in r.stderr


# --------------------------------------------------------------------------- in-process
def test_inbox_handler_never_raises_and_observer_restarts(tmp_path):
    from streamcoadd.service.inbox import Inbox

    ib = Inbox(tmp_path / "in", stable_seconds=0.0, reconcile_interval=3600)
    ib.start()
    try:
        h = ib.handler

        class Bad:
            is_directory = False
            event_type = "created"

            @property
            def src_path(self):
                raise RuntimeError("boom")

        h.on_any_event(Bad())  # swallowed, counted, rescan requested
        assert ib.handler_errors >= 1 and ib.observer_alive()
        ib.observer.stop()
        ib.observer.join(5)
        assert not ib.observer_alive()
        assert ib.ensure_alive() and ib.observer_alive() and ib.observer_restarts == 1
        put(ib.path, "x.fits", b"data")
        wait_for(lambda: (ib.refresh(), ib.next_ready())[1] == "x.fits", 5,
                 "restarted observer does not deliver")
    finally:
        ib.stop()


def test_inbox_stability_and_bounds(tmp_path):
    from streamcoadd.service.inbox import Inbox

    d = tmp_path / "in"
    d.mkdir()
    for i in range(30):
        (d / f"f{i:02d}.fits").write_bytes(b"x")
        os.utime(d / f"f{i:02d}.fits", ns=(i * 10**9, i * 10**9))
    ib = Inbox(d, stable_seconds=1.0, reconcile_interval=3600, max_tracked=10)
    t = 1000.0
    ib.refresh(t)  # initial scan: the 10 oldest, not yet stable
    assert ib.counts()["waiting"] == 10 and ib.counts()["backlog_untracked"]
    assert ib.next_ready() is None
    (d / "f00.fits").write_bytes(b"xy")  # still being written
    ib.refresh(t + 1.1)
    got = []
    while (n := ib.next_ready()) is not None:
        got.append(n)
    assert got == [f"f{i:02d}.fits" for i in range(1, 10)]  # discovery (mtime) order
    for n in got:
        os.unlink(d / n)
        ib.forget(n)
    ib.refresh(t + 2.2)  # f00 now stable; backlog rescanned below the low-water mark
    assert ib.next_ready() == "f00.fits"
    assert ib.counts()["waiting"] == 9
    assert not ib.eligible(".f.fits.XYZ") and not ib.eligible("a.fits.tmp")
    assert not ib.eligible("a.txt") and ib.eligible("a.fits")


def test_inbox_dropped_hints_trigger_rescan(tmp_path):
    """More events than the hint list holds (like an inotify overflow): nothing is lost."""
    from streamcoadd.service.inbox import Inbox

    ib = Inbox(tmp_path / "in", stable_seconds=0.0, reconcile_interval=3600, max_hints=5)
    ib.start()
    try:
        ib.refresh()
        for i in range(50):
            put(ib.path, f"h{i:02d}.fits", b"x")
        wait_for(lambda: ib.hints_dropped > 0, 5, "hints were not dropped")
        time.sleep(0.2)
        ib.refresh()
        ib.refresh()
        got = set()
        while (n := ib.next_ready()) is not None:
            got.add(n)
        assert got == {f"h{i:02d}.fits" for i in range(50)}
        assert ib.scans >= 2
    finally:
        ib.stop()


def test_systemd_notify(area, tmp_path):
    """Type=notify and WatchdogSec: READY=1 once watching, WATCHDOG=1 pings, STOPPING=1."""
    import socket as so

    state, inbox, tmp = area
    addr = str(tmp / "notify.sock")
    sock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(0.2)
    e = env()
    e["NOTIFY_SOCKET"] = addr
    e["WATCHDOG_USEC"] = "400000"
    p = subprocess.Popen([sys.executable, "-m", "streamcoadd", "watch", str(state), "--inbox",
                          str(inbox), *FAST], cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    msgs = []
    try:
        t = time.monotonic() + 20
        while time.monotonic() < t and sum("WATCHDOG=1" in m for m in msgs) < 2:
            try:
                msgs.append(sock.recv(4096).decode())
            except so.timeout:
                pass
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, p.stderr.read()
        t = time.monotonic() + 5
        while time.monotonic() < t and not any("STOPPING=1" in m for m in msgs):
            try:
                msgs.append(sock.recv(4096).decode())
            except so.timeout:
                pass
    finally:
        if p.poll() is None:
            p.kill()
        sock.close()
    assert "READY=1" in msgs[0] and f"MAINPID={p.pid}" in msgs[0]
    assert sum("WATCHDOG=1" in m for m in msgs) >= 2
    assert any("STOPPING=1" in m for m in msgs)


def test_daemon_with_restart_equals_batch(area, daemons, tmp_path):
    """Warps arriving in random order across a SIGTERM and a kill -9 give the same coadd, to
    round-off, as a batch ingest of the same files in sorted order."""
    from streamcoadd.core.config import RunConfig
    from streamcoadd.pipeline.ingest import LocalIngestor
    from streamcoadd.store.state import StateStore

    state, inbox, tmp = area
    tract = load_skymap(SKYMAP).tract(0)
    rng = np.random.default_rng(42)
    src = tmp / "src"
    src.mkdir()
    n = 40
    for v in range(n):
        big = v % 5 == 0  # some cover 2x2 cells
        size = 100 if big else N
        origin = (0, 0) if big else ORIGINS[v % 4]
        var = rng.uniform(0.5, 2.0)
        write_warp(src / f"e{v:02d}.fits", tract=tract, xy0=origin,
                   image=rng.normal(10, np.sqrt(var), (size, size)),
                   mask=np.zeros((size, size), np.int32), variance=np.full((size, size), var),
                   psf=psf(), visit=v, detector=3, band="r")
    # batch reference
    ref = make_state(tmp_path / "ref")
    with StateStore.open(ref, write=True) as store:
        ing = LocalIngestor(store, RunConfig(commit_every=1000))
        for f in sorted(src.iterdir()):
            assert ing.submit(f).status == "pending"
        ing.commit()
    # daemon: shuffled arrivals, SIGTERM, restart, SIGKILL, restart
    order = rng.permutation(n)
    for k, (lo, hi, sig) in enumerate([(0, 15, signal.SIGTERM), (15, 30, signal.SIGKILL),
                                       (30, n, None)]):
        d = daemons(state, inbox, *FAST, "--commit-every", "4",
                    *(("--until-idle", "1") if sig is None else ()))
        d.wait_running()
        for v in order[lo:hi]:
            put(inbox, f"e{v:02d}.fits", (src / f"e{v:02d}.fits").read_bytes())
        if sig is None:
            assert d.wait(60) == 0, d.text()
        else:
            time.sleep(0.3)
            d.signal(sig)
            d.wait(30)
    assert not list(inbox.glob("*.fits"))
    with streamcoadd.open_state(ref) as a, streamcoadd.open_state(state) as b:
        cells = a.populated_cells("r")
        assert cells and cells == b.populated_cells("r")
        for c in cells:
            ca, cb = a.cell(c, "r"), b.cell(c, "r")
            assert sorted(ca.contributors["visit"]) == sorted(cb.contributors["visit"])
            for k in ("image", "variance", "psf"):
                x, y = getattr(ca, k), getattr(cb, k)
                ok = np.isfinite(x)
                assert np.array_equal(ok, np.isfinite(y))
                np.testing.assert_allclose(y[ok], x[ok], rtol=1e-10, atol=0)


@pytest.mark.parametrize("point", ["cells-durable:3", "manifest-committed:3"])
def test_crash_inside_commit_then_restart(area, daemons, point):
    """kill -9 inside the 3rd commit (core crash points): before the commit point the batch
    is refolded, after it the files are still in the inbox but already durable."""
    state, inbox, tmp = area
    n = 20
    for v in range(n):
        (inbox / f"k{v:02d}.fits").write_bytes(warp_bytes(v))
    d = daemons(state, inbox, *FAST, "--commit-every", "4",
                extra_env={"STREAMCOADD_CRASH_AT": point})
    assert d.wait(60) == -signal.SIGKILL, d.text()
    assert len(list(inbox.glob("*.fits"))) == n - 8  # two batches of 4 left the inbox
    d2 = daemons(state, inbox, *FAST, "--commit-every", "4", "--until-idle", "1")
    assert d2.wait(60) == 0, d2.text()
    assert not list(inbox.glob("*.fits"))
    assert_once(state, {(v, 1) for v in range(n)})
    with streamcoadd.open_state(state) as st:
        statuses = collections.Counter(st.warps()["status"])
    assert statuses == {"folded": n}, statuses
