"""The daemon on a full disk, for real: a small tmpfs holds the state, a ballast file fills
it until a commit fails. The daemon must pause with one clear message (status file,
``streamcoadd status``, Prometheus gauge), stay alive with a consistent state, keep the
batch in its inbox, and resume by itself once the ballast is deleted: every warp durable
exactly once, the sums equal to a reference ingest of the same warps. SIGTERM during the
pause stops it at once; a warp that cannot be quarantined on a full disk waits in the inbox
instead of being reported as an internal error; stale temporary files of a killed daemon
are removed from rejected/ at start.

Needs root and mount(2) (skipped with the reason otherwise); the injection tests of
``tests/test_diskfull.py`` cover the write layers without a real filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torture
from test_daemon import cli, daemons, wait_for  # noqa: F401 (daemons: a fixture)

from streamcoadd.analysis.verify import verify_state
from streamcoadd.cli.main import main

RETRY = ["--write-retry-initial", "0.2", "--write-retry-max", "1"]
FH = {"PYTHONFAULTHANDLER": "1"}  # a hung daemon dumps its threads on SIGABRT
FAST = ["--commit-every", "2", "--idle-commit", "0.1", "--stable-seconds", "0.2"]


@pytest.fixture(scope="module")
def warps_and_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("dfull")
    warps = torture.make_warp_set(d / "warps", n=12, seed=52)
    ref = d / "ref"
    torture._quiet(main, ["init", str(ref), "--skymap", str(torture.SKYMAP)])
    assert torture._quiet(main, ["ingest", str(ref), *map(str, warps), "--quiet",
                                 "--commit-every", "2"]) == 0
    bad = d / "bad.fits"  # a truncated warp: must end in rejected/ with a real reason
    bad.write_bytes(warps[0].read_bytes()[:5000])
    return warps, ref, bad


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (tests/test_diskfull.py injects ENOSPC instead)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, slack: int = 0) -> Path:
    """Write a ballast file until the filesystem is full, then give back ``slack`` bytes
    (room for the small status file, far less than any commit needs)."""
    ballast = mnt / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    chunk = b"\xa5" * (1 << 16)
    try:
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    continue
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    finally:
        os.close(fd)
    if slack:
        os.truncate(ballast, max(0, ballast.stat().st_size - slack))
    return ballast


def deliver(inbox: Path, files) -> None:
    """The producer convention: write NAME.tmp in the inbox, rename."""
    for f in files:
        tmp = inbox / (Path(f).name + ".tmp")
        tmp.write_bytes(Path(f).read_bytes())
        os.rename(tmp, inbox / Path(f).name)


def stopped(d, timeout: float = 60) -> int:
    """Wait for the daemon to exit; if it hangs, dump its threads (faulthandler) and fail
    with its log."""
    try:
        return d.p.wait(timeout)
    except subprocess.TimeoutExpired:
        d.p.send_signal(signal.SIGABRT)
        d.p.wait(10)
        raise AssertionError(f"daemon did not exit; log:\n{d.text()}") from None


def events(log_text: str, name: str) -> list[dict]:
    out = []
    for line in log_text.splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if d.get("event") == name:
            out.append(d)
    return out


def test_disk_full_pauses_then_resumes_in_process(tmpfs, warps_and_ref, tmp_path, daemons):
    warps, ref, bad = warps_and_ref
    st = tmpfs / "state"
    assert cli("init", st, "--skymap", torture.SKYMAP).returncode == 0
    box = tmp_path / "box"
    inbox, done, rejected = box / "inbox", box / "done", box / "rejected"
    inbox.mkdir(parents=True)
    metrics = tmp_path / "metrics.prom"
    d = daemons(st, inbox, "--done", done, "--rejected", rejected, "--metrics-file", metrics,
                "--log-json", *FAST, *RETRY, extra_env=FH)
    d.wait_running()
    first, rest = warps[:4], warps[4:]
    deliver(inbox, first)
    wait_for(lambda: done.exists() and len(list(done.iterdir())) == len(first), 60,
             lambda: f"first warps not done; log:\n{d.text()}")

    ballast = fill(tmpfs, slack=256 << 10)
    deliver(inbox, [*rest, bad])
    wait_for(lambda: (s := d.status()) and s["state"] == "paused"
             and s["paused"]["probes"] >= 2, 60,
             lambda: f"daemon did not pause (and probe again); log:\n{d.text()}")

    # paused, alive, one clear message, everything visible
    assert d.p.poll() is None
    log = d.text()
    paused = events(log, "paused")
    assert len(paused) == 1, log
    ev = paused[0]
    assert ev["errno"] == "ENOSPC" and ev["path"].startswith(str(st)), ev
    assert "No space left on device" in ev["error"]
    assert "PAUSED" in ev["message"] and "free space" in ev["message"] \
        and "resumes by itself" in ev["message"], ev
    assert "Traceback" not in log and "internal error" not in log, log
    s = d.status()
    assert s["paused"]["errno"] == "ENOSPC" and s["pending"] == 0
    assert s["counts"]["write_errors"] >= 1
    assert 'streamcoadd_paused{state_dir="%s",reason="write_error"} 1' % st.absolute() \
        in metrics.read_text()
    out = cli("status", st, "--priority", "normal")
    assert out.returncode == 0 and "PAUSED (write error)" in out.stdout, out.stdout + out.stderr
    v = cli("verify", st)  # a reader beside the paused daemon
    assert v.returncode == 0 or (v.returncode == 1 and " 0 error(s)" in v.stdout), v.stdout
    assert [p for p in verify_state(st) if p.severity == "error"] == []
    assert not list((st / "shards").rglob("*.tmp")), "debris on the full disk"
    left = {p.name for p in inbox.iterdir()}
    assert left, "warps left the inbox although the disk is full"
    assert {p.name for p in rejected.glob("*")} <= {"bad.fits", "bad.fits.reason"}, \
        "a good warp was rejected"

    # space comes back: the daemon resumes by itself
    ballast.unlink()
    wait_for(lambda: not any(inbox.iterdir()) and (s := d.status())
             and s["state"] in ("running", "idle") and s["pending"] == 0, 120,
             lambda: f"daemon did not resume and drain; log:\n{d.text()}")
    d.signal(signal.SIGTERM)
    assert stopped(d) == 0
    log = d.text()
    assert len(events(log, "resumed")) >= 1, log
    assert "internal error" not in log and "Traceback" not in log
    # every warp once: done/ holds each delivered file once, the state equals the reference
    assert sorted(p.name for p in done.iterdir()) == sorted(w.name for w in warps)
    assert sorted(p.name for p in rejected.iterdir()) == ["bad.fits", "bad.fits.reason"]
    assert "internal error" not in (rejected / "bad.fits.reason").read_text()
    assert verify_state(st) == []
    assert torture.compare_states(ref, st) == []
    assert 'reason="write_error"} 0' in metrics.read_text()


@pytest.mark.parametrize("full", ["state", "rejected"])
def test_sigterm_during_pause_and_quarantine_on_a_full_disk(tmpfs, warps_and_ref, tmp_path,
                                                             daemons, full):
    """A truncated warp arrives while the disk is full: the state's disk (the ledger
    cannot record the rejection) or rejected/'s disk (its .reason cannot be written). It is
    not reported as an internal error: it waits in the inbox, the daemon pauses; SIGTERM
    stops the paused daemon at once (exit 0). A restart with space removes the
    .NAME.PID.tmp debris a killed daemon left in rejected/ and quarantines the warp."""
    warps, ref, bad = warps_and_ref
    st = (tmpfs if full == "state" else tmp_path) / "state"
    assert cli("init", st, "--skymap", torture.SKYMAP).returncode == 0
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    rejected = (tmpfs if full == "rejected" else tmp_path) / "rejected"
    inbox.mkdir()
    args = ["--done", done, "--rejected", rejected, "--log-json", *FAST, *RETRY]
    d = daemons(st, inbox, *args, extra_env=FH)
    d.wait_running()
    ballast = fill(tmpfs)  # completely full (the daemon already holds its files open)
    deliver(inbox, [bad, warps[0]])
    wait_for(lambda: events(d.text(), "paused"), 60,
             lambda: f"daemon did not pause; log:\n{d.text()}")
    assert d.p.poll() is None
    ev = events(d.text(), "paused")[0]
    if full == "state":  # SQLite reports a full disk as SQLITE_FULL, without an errno
        assert ev["errno"] in ("ENOSPC", "SQLITE_FULL") and ev["during"] in ("submit",
                                                                              "commit"), ev
    else:
        assert ev["errno"] == "ENOSPC" and ev["during"] == "quarantine", ev
        assert ev["path"].startswith(str(rejected)), ev
        assert events(d.text(), "reject-deferred"), d.text()
    assert (inbox / "bad.fits").exists(), "the warp left the inbox without a quarantine"
    assert not (rejected / "bad.fits").exists()
    assert not [p for p in rejected.iterdir() if p.name.endswith(".tmp")], \
        "a partial .reason was left on the full disk"
    d.signal(signal.SIGTERM)
    assert stopped(d, 30) == 0  # prompt: the pause waits on the signal, not on the back-off
    log = d.text()
    assert "internal error" not in log and "Traceback" not in log, log
    assert events(log, "stop"), log
    assert (inbox / "bad.fits").exists() and (inbox / warps[0].name).exists()
    assert [p for p in verify_state(st) if p.severity == "error"] == []

    # debris of a daemon killed while writing a .reason (its pid is dead), and a file of
    # the same shape from a live process (kept), and an unrelated hidden file (kept)
    ballast.unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = rejected / f".x.fits.reason.{dead.pid}.tmp"
    live = rejected / f".y.fits.reason.{os.getpid()}.tmp"
    other = rejected / ".notes.tmp"
    for f in (stale, live, other):
        f.write_text("partial")
    d2 = daemons(st, inbox, *args, "--until-idle", "0.5", extra_env=FH)
    assert stopped(d2) == 0, d2.text()
    assert not stale.exists() and live.exists() and other.exists()
    assert "removed-stale-tmp" in d2.text()
    assert (rejected / "bad.fits").exists()
    reason = (rejected / "bad.fits.reason").read_text()
    assert "internal error" not in reason and "bad.fits" in reason
    assert (done / warps[0].name).exists() and not any(inbox.iterdir())
    assert verify_state(st) == []
    assert "internal error" not in d2.text()
