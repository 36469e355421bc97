#!/usr/bin/env python3
"""Kill -9 torture harness for streamcoadd (issue 5).

Runs ``streamcoadd ingest`` (or the daemon, ``streamcoadd watch``) on a set of small warps
in a child process, kills it with SIGKILL -- at random instants and at every named crash
point of the commit protocol (``STREAMCOADD_CRASH_AT=name:N``) -- restarts it, and repeats
until every warp is done. Then it compares the state with an uninterrupted reference run:

* every warp is in every cell it should touch exactly once (contributor lists equal the
  reference's, per cell and group, as multisets of (visit, detector, content_hash));
* every accumulator array equals the reference to 1e-10 relative;
* every shard manifest lists the same warps and cells; the ledger has the same rows
  (status, n_cells);
* no stray ``.tmp`` file, no generation file that no manifest names, every HDF5 file
  readable and every dataset matches its CRC-32 checksum;
* ``streamcoadd.analysis.verify.verify_state`` finds nothing.

After every single kill the state is also checked *before* the restart: ``verify_state``
may then report only benign problems (debris of the interrupted commit, a warp committed
to its shards but not yet in the ledger); in daemon mode every file already moved to
``done/`` must be in the ledger and in the manifests (a warp leaves the inbox only after
its commit).

Usage::

    python3 scripts/torture.py --kills 1000              # the full run (ingest + daemon)
    python3 scripts/torture.py --kills 50 --mode ingest --workdir /tmp/t

Launchers: ``fork`` (default) forks a child from this already-initialised interpreter and
runs ``streamcoadd.cli.main`` in it -- the same code in a separate process, killed the same
way, but without 2 s of imports per restart; ``exec`` runs ``python3 -m streamcoadd`` as a
fresh interpreter (the real CLI). ``--exec-fraction`` mixes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from streamcoadd.core.masks import CANONICAL_PLANES  # noqa: E402
from streamcoadd.core.skymap import load_skymap  # noqa: E402
from streamcoadd.io.warp_writer import write_warp  # noqa: E402

SKYMAP = ROOT / "config" / "skymap-demo.toml"
CRASH_POINTS = ("cell-tmp-written", "cell-renamed", "cells-durable", "manifest-tmp-written",
                "manifest-committed", "old-generation-deleted", "before-ledger",
                "ledger-committed", "debris-removed")
DAEMON_CRASH_POINTS = ("daemon-before-done", "daemon-moved-done")
# Points an uninterrupted run never reaches (only after an earlier kill left debris).
RARE_POINTS = {"debris-removed": 3}
REL_TOL = 1e-10


# ---------------------------------------------------------------------------- warps
def gaussian_psf(size: int = 21, sigma: float = 2.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return p / p.sum()


def make_warp(path, tract, xy0, shape, visit, detector, band="r", seed=0, nodata_stripe=False,
              bad_fraction=0.0, psf_sigma=2.0):
    """One small synthetic warp: noise + a few stars, optional NO_DATA stripe and BAD pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    var0 = float(rng.uniform(0.5, 2.0))
    image = rng.normal(0, np.sqrt(var0), (h, w)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(3):
        cx, cy, f = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(50, 500)
        image += (f * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * psf_sigma**2))).astype(np.float32)
    variance = np.full((h, w), var0, np.float32)
    mask = np.zeros((h, w), np.int32)
    if bad_fraction:
        bad = rng.random((h, w)) < bad_fraction
        mask[bad] |= 1 << CANONICAL_PLANES["BAD"]
        sat = rng.random((h, w)) < bad_fraction / 4
        mask[sat] |= 1 << CANONICAL_PLANES["SAT"]
    if nodata_stripe:
        mask[:, : w // 5] |= 1 << CANONICAL_PLANES["NO_DATA"]
        image[:, : w // 5] = np.nan
        variance[:, : w // 5] = np.inf
    mask[rng.random((h, w)) < 0.01] |= 1 << CANONICAL_PLANES["DETECTED"]
    return write_warp(path, tract=tract, xy0=xy0, image=image, mask=mask, variance=variance,
                      psf=gaussian_psf(21, psf_sigma), visit=visit, detector=detector,
                      band=band, mjd=60000.0 + visit)


def make_warp_set(outdir, n: int = 12, seed: int = 1, skymap_path=SKYMAP) -> list[Path]:
    """``n`` small warps on tract 0 of the demo skymap: random positions (many straddle a
    patch boundary, so one warp commits several shards), two bands, some with a NO_DATA
    stripe or enough BAD pixels to be fallback inputs, one covering no cell fully, and one
    byte-identical copy (delivered twice: must be folded once)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tract = load_skymap(skymap_path).tract(0)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        if i == n - 2:  # covers no cell's inner box fully
            xy0, shape = (rng.randrange(0, 500), rng.randrange(0, 500)), (30, 30)
        else:
            shape = (rng.randrange(100, 170), rng.randrange(100, 170))
            # around the corner where the 4 patches meet (x, y = 300): warps overlap one
            # another and most straddle 2 or 4 shards
            xy0 = (rng.randrange(170, 330), rng.randrange(170, 330))
        band = "r" if i % 4 else "g"
        p = make_warp(outdir / f"w{i:03d}.fits", tract, xy0, shape, visit=1000 + i,
                      detector=i % 7, band=band, seed=seed * 1000 + i,
                      nodata_stripe=(i % 5 == 2), bad_fraction=(0.6 if i % 6 == 3 else 0.01),
                      psf_sigma=1.5 + 0.1 * (i % 5))
        paths.append(p)
    dup = outdir / f"w{n:03d}-copy.fits"
    shutil.copyfile(paths[1], dup)
    paths.append(dup)
    return paths


# ---------------------------------------------------------------------------- child processes
def _cli_argv(mode: str, state: Path, warps: list[Path], inbox: Path | None, commit_every: int):
    if mode == "ingest":
        return ["ingest", str(state), *map(str, warps), "--commit-every", str(commit_every),
                "--quiet"]
    return ["watch", str(state), "--inbox", str(inbox), "--done", str(inbox.parent / "done"),
            "--rejected", str(inbox.parent / "rejected"), "--until-idle", "0.3",
            "--commit-every", str(commit_every), "--idle-commit", "0.1", "--poll", "0.05",
            "--stable-seconds", "0.2"]


@dataclass
class RunResult:
    killed: bool
    rc: int | None
    seconds: float
    how: str  # "crash-point", "random", "none"


def run_child(argv: list[str], crash_at: str | None, kill_after: float | None,
              launcher: str, log, timeout: float = 300.0) -> RunResult:
    """Run the CLI with ``argv`` in a child process; SIGKILL it after ``kill_after`` s."""
    env = dict(os.environ)
    env.pop("STREAMCOADD_CRASH_AT", None)
    if crash_at:
        env["STREAMCOADD_CRASH_AT"] = crash_at
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    if launcher == "exec":
        import subprocess

        p = subprocess.Popen([sys.executable, "-m", "streamcoadd", *argv], env=env,
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        pid = p.pid
    else:
        log.flush()
        pid = os.fork()
        if pid == 0:  # child
            rc = 70
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os.environ.clear()
                os.environ.update(env)
                from streamcoadd.cli.main import main
                from streamcoadd.store import durable

                durable._hits.clear()
                rc = main(argv)
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                os._exit(rc if isinstance(rc, int) else 70)
    killed_by_us = False
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            break
        now = time.monotonic() - t0
        if (kill_after is not None and now >= kill_after) or now > timeout:
            os.kill(pid, signal.SIGKILL)
            killed_by_us = True
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    if launcher == "exec":
        p.returncode = -1  # reaped above; keep Popen from waiting again
    dt = time.monotonic() - t0
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:
            raise RuntimeError(f"child died of signal {sig}")
        return RunResult(True, None, dt, "random" if killed_by_us else "crash-point")
    return RunResult(False, os.WEXITSTATUS(status), dt, "none")


# ---------------------------------------------------------------------------- comparing states
def _cells(state: Path) -> dict:
    """{(tract, px, py, band, cx, cy): CellAccumulator} of every committed cell."""
    from streamcoadd.store.state import StateStore

    out = {}
    with StateStore.open(state, write=False) as st:
        for patch, band in st.shard_keys():
            m = st.load_manifest(patch, band)
            for cx, cy in m.cells:
                from streamcoadd.core.skymap import CellId

                acc, _ = st.read_cell(CellId(patch, cx, cy), band)
                out[(patch.tract, patch.x, patch.y, band, cx, cy)] = acc
    return out


def _manifests(state: Path) -> dict:
    out = {}
    for m in sorted((state / "shards").glob("t*/p*/*/manifest.json")):
        d = json.loads(m.read_text())
        out[str(m.parent.relative_to(state))] = (set(d["cells"]), set(d["warps"]))
    return out


def _ledger(state: Path) -> dict:
    import sqlite3

    db = sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in db.execute(
            "SELECT content_hash, visit, detector, band, status, n_cells FROM warps")}
    finally:
        db.close()


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "iub":
        return bool(np.array_equal(a, b))
    scale = np.maximum(np.abs(a), np.abs(b))
    return bool(np.all(np.abs(a - b) <= REL_TOL * scale + 1e-300))


def compare_states(ref: Path, got: Path) -> list[str]:
    """Differences between two states that should hold the same coadd (empty if equal)."""
    problems = []
    mr, mg = _manifests(ref), _manifests(got)
    if set(mr) != set(mg):
        problems.append(f"shards differ: ref {sorted(mr)} got {sorted(mg)}")
    for k in set(mr) & set(mg):
        if mr[k][0] != mg[k][0]:
            problems.append(f"{k}: cells differ: {sorted(mr[k][0] ^ mg[k][0])}")
        if mr[k][1] != mg[k][1]:
            problems.append(f"{k}: manifest warps differ: {sorted(mr[k][1] ^ mg[k][1])}")
    lr, lg = _ledger(ref), _ledger(got)
    if lr != lg:
        for h in sorted(set(lr) | set(lg)):
            if lr.get(h) != lg.get(h):
                problems.append(f"ledger row {h[:12]}: ref {lr.get(h)} got {lg.get(h)}")
    cr, cg = _cells(ref), _cells(got)
    if set(cr) != set(cg):
        problems.append(f"cells differ: {sorted(set(cr) ^ set(cg))}")
    for key in sorted(set(cr) & set(cg)):
        a, b = cr[key], cg[key]
        if set(a.groups) != set(b.groups):
            problems.append(f"cell {key}: groups {sorted(a.groups)} vs {sorted(b.groups)}")
            continue
        for gname in a.groups:
            ga, gb = a.groups[gname], b.groups[gname]
            ca = Counter((c.visit, c.detector, c.content_hash) for c in ga.contributors)
            cb = Counter((c.visit, c.detector, c.content_hash) for c in gb.contributors)
            if ca != cb:
                problems.append(f"cell {key} {gname}: contributors differ: ref {sorted(ca.items())} "
                                f"got {sorted(cb.items())}")
            if any(n != 1 for n in cb.values()):
                problems.append(f"cell {key} {gname}: a warp counted more than once: {cb}")
            for ds in ("sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "mask_or", "noise",
                       "psf_sum"):
                if not _close(getattr(ga, ds), getattr(gb, ds)):
                    problems.append(f"cell {key} {gname}: {ds} differs beyond {REL_TOL:g}")
            if not _close(np.array([ga.psf_w]), np.array([gb.psf_w])):
                problems.append(f"cell {key} {gname}: psf_w {ga.psf_w} vs {gb.psf_w}")
            for attr in ("planes", "bit_counts"):
                da, db = getattr(ga, attr), getattr(gb, attr)
                if set(da) != set(db) or any(not _close(da[k], db[k]) for k in da):
                    problems.append(f"cell {key} {gname}: {attr} differ")
    return problems


def hygiene(state: Path) -> list[str]:
    """No stray temporary files, no unreferenced generation, every HDF5 file fully readable."""
    import h5py

    from streamcoadd.store.cellfile import read_cell_file

    problems = [f"stray temporary file {p}" for p in state.rglob("*.tmp")]
    live = set()
    for m in (state / "shards").glob("t*/p*/*/manifest.json"):
        d = json.loads(m.read_text())
        live |= {m.parent / f"c{k}.g{g}.h5" for k, g in d["cells"].items()}
    for f in (state / "shards").rglob("*.h5"):
        if f not in live:
            problems.append(f"generation no manifest names: {f}")
        try:
            with h5py.File(f, "r", locking=False) as h:
                h.visititems(lambda n, o: o[()] if isinstance(o, h5py.Dataset) else None)
            read_cell_file(f)  # checks every dataset's CRC-32
        except Exception as e:  # noqa: BLE001
            problems.append(f"unreadable HDF5 {f}: {e}")
    for f in live:
        if not f.exists():
            problems.append(f"manifest names a missing file {f}")
    return problems


# ---------------------------------------------------------------------------- one episode
@dataclass
class Tally:
    kills: int = 0
    kills_by: Counter = field(default_factory=Counter)  # crash point name or "random"
    runs: int = 0
    episodes: int = 0
    completed_without_kill: int = 0  # a crash point whose N was never reached
    failures: list = field(default_factory=list)
    launchers: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        return {"episodes": self.episodes, "runs": self.runs, "kills": self.kills,
                "kills_by": dict(sorted(self.kills_by.items())),
                "runs_by_launcher": dict(self.launchers),
                "crash_point_runs_that_completed": self.completed_without_kill,
                "failures": len(self.failures)}


def count_hits(mode: str, warps, workdir: Path, commit_every: int) -> dict[str, int]:
    """How often each crash point is reached in one uninterrupted run (in this process)."""
    from streamcoadd.cli.main import main
    from streamcoadd.store import cellfile, durable, ledger
    from streamcoadd.store import state as state_mod

    hits = Counter()
    mods = [durable, cellfile, ledger, state_mod]
    try:
        daemon_mod = __import__("streamcoadd.service.daemon", fromlist=["x"])
        mods.append(daemon_mod)
    except ImportError:
        pass
    saved = [(m, m.crash_point) for m in mods if hasattr(m, "crash_point")]
    st = workdir / "count-state"
    shutil.rmtree(st, ignore_errors=True)
    _quiet(main, ["init", str(st), "--skymap", str(SKYMAP)])
    inbox = _fill_inbox(workdir / "count-box" / "inbox", warps) if mode == "daemon" else None
    try:
        for m, _ in saved:
            m.crash_point = lambda name: hits.update([name])
        _quiet(main, _cli_argv(mode, st, warps, inbox, commit_every))
    finally:
        for m, f in saved:
            m.crash_point = f
    shutil.rmtree(st, ignore_errors=True)
    if inbox is not None:
        shutil.rmtree(inbox.parent, ignore_errors=True)
    return dict(hits)


def _quiet(fn, *args):
    """Call ``fn(*args)`` with stdout and stderr silenced; returns its result."""
    import contextlib

    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        return fn(*args)


def _fill_inbox(inbox: Path, warps) -> Path:
    shutil.rmtree(inbox.parent if inbox.name == "inbox" else inbox, ignore_errors=True)
    inbox.mkdir(parents=True)
    for w in warps:
        tmp = inbox / (Path(w).name + ".tmp")
        shutil.copyfile(w, tmp)
        os.replace(tmp, inbox / Path(w).name)
    return inbox


def _fraction_left(state: Path, hashes: dict) -> float:
    """Fraction of the distinct warps not yet in the ledger."""
    import sqlite3

    want = set(hashes.values())
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True)
        try:
            have = {r[0] for r in db.execute("SELECT content_hash FROM warps")}
        finally:
            db.close()
    except sqlite3.Error:
        return 1.0
    return len(want - have) / max(1, len(want))


def _check_after_kill(state: Path, mode: str, inbox: Path | None, hashes: dict) -> list[str]:
    """Right after a kill, before any restart: only benign problems are allowed."""
    from streamcoadd.analysis.verify import verify_state

    out = [f"after kill: {p}" for p in verify_state(state) if p.severity == "error"]
    if mode == "daemon" and inbox is not None:
        done = inbox.parent / "done"
        ledger = _ledger(state) if (state / "ledger.sqlite").exists() else {}
        in_manifests = set()
        for _, (_, ws) in _manifests(state).items():
            in_manifests |= ws
        for f in done.glob("*.fits") if done.exists() else []:
            h = hashes.get(f.name)
            if h is None:
                continue
            if h not in ledger:
                out.append(f"after kill: {f.name} is in done/ but not in the ledger")
            elif ledger[h][4] > 0 and h not in in_manifests:
                out.append(f"after kill: {f.name} is in done/ but in no shard manifest")
    return out


def episode(mode: str, warps: list[Path], ref: Path, workdir: Path, rng: random.Random,
            hits: dict[str, int], full_seconds: dict[str, float], tally: Tally,
            kills_wanted: int, exec_fraction: float, commit_every: int, log,
            check_every_kill: bool = True, points=None) -> None:
    """Fresh state; kill/restart until a run completes; then compare with ``ref``."""
    from streamcoadd.cli.main import main as cli_main
    from streamcoadd.core.warp import file_hash

    state = workdir / f"state-{mode}"
    shutil.rmtree(state, ignore_errors=True)
    _quiet(cli_main, ["init", str(state), "--skymap", str(SKYMAP)])
    inbox = _fill_inbox(workdir / f"box-{mode}" / "inbox", warps) if mode == "daemon" else None
    hashes = {Path(w).name: file_hash(Path(w).read_bytes()) for w in warps}
    hits = {**RARE_POINTS, **hits}
    points = [p for p in (points or CRASH_POINTS) if hits.get(p)]
    tally.episodes += 1
    kills_here = 0
    while True:
        launcher = "exec" if rng.random() < exec_fraction else "fork"
        crash_at, kill_after = None, None
        if kills_here < kills_wanted:
            # Aim inside the work that is left, so that most runs are killed.
            left = max(0.15, _fraction_left(state, hashes))
            if points and rng.random() < 0.6:
                name = rng.choice(points)
                crash_at = f"{name}:{rng.randint(1, max(1, round(hits[name] * left)))}"
            else:
                kill_after = rng.uniform(0.0, full_seconds[launcher] * left
                                         + (full_seconds["exec"] - full_seconds["fork"]
                                            if launcher == "exec" else 0.0))
        print(f"[{mode} ep{tally.episodes} run{tally.runs}] launcher={launcher} "
              f"crash_at={crash_at} kill_after={kill_after}", file=log, flush=True)
        res = run_child(_cli_argv(mode, state, warps, inbox, commit_every), crash_at,
                        kill_after, launcher, log)
        tally.runs += 1
        tally.launchers[launcher] += 1
        if res.killed:
            kills_here += 1
            tally.kills += 1
            tally.kills_by[crash_at.split(":")[0] if res.how == "crash-point" else "random"] += 1
            if check_every_kill:
                for p in _check_after_kill(state, mode, inbox, hashes):
                    tally.failures.append(f"{mode} episode {tally.episodes}: {p}")
            continue
        if crash_at:
            tally.completed_without_kill += 1
        if res.rc != 0:
            tally.failures.append(f"{mode} episode {tally.episodes}: run exited {res.rc} "
                                  f"(crash_at={crash_at}); see the log")
            return
        if mode == "daemon" and any(inbox.glob("*.fits")):
            continue  # until-idle returned with files left (should not happen): run again
        break
    problems = compare_states(ref, state) + hygiene(state)
    from streamcoadd.analysis.verify import verify_state

    problems += [f"verify: {p}" for p in verify_state(state)]
    if mode == "daemon":
        left = sorted(p.name for p in inbox.iterdir())
        if left:
            problems.append(f"inbox not empty at the end: {left}")
        rej = inbox.parent / "rejected"
        if rej.exists() and any(rej.iterdir()):
            problems.append(f"rejected/ not empty: {sorted(p.name for p in rej.iterdir())}")
        done = sorted(p.name for p in (inbox.parent / "done").glob("*.fits"))
        if done != sorted(Path(w).name for w in warps):
            problems.append(f"done/ holds {done}")
    for p in problems:
        tally.failures.append(f"{mode} episode {tally.episodes} ({kills_here} kills): {p}")


def build_reference(mode: str, warps, workdir: Path, commit_every: int, log) -> tuple[Path, float]:
    """Uninterrupted run (same mode, fork launcher); returns the state and its duration."""
    from streamcoadd.cli.main import main as cli_main

    ref = workdir / f"ref-{mode}"
    shutil.rmtree(ref, ignore_errors=True)
    _quiet(cli_main, ["init", str(ref), "--skymap", str(SKYMAP)])
    inbox = _fill_inbox(workdir / f"refbox-{mode}" / "inbox", warps) if mode == "daemon" else None
    res = run_child(_cli_argv(mode, ref, warps, inbox, commit_every), None, None, "fork", log)
    if res.killed or res.rc != 0:
        raise RuntimeError(f"reference {mode} run failed (rc {res.rc}); see the log")
    return ref, res.seconds


def daemon_available() -> bool:
    try:
        import streamcoadd.service.daemon  # noqa: F401
    except ImportError:
        return False
    return True


def torture(kills: int, modes=("ingest", "daemon"), workdir: Path | None = None,
            n_warps: int = 12, seed: int = 0, exec_fraction: float = 0.1,
            kills_per_episode: int = 8, commit_every: int = 3, log=None,
            check_every_kill: bool = True, verbose: bool = False) -> Tally:
    """Run until ``kills`` SIGKILLs have happened (split across ``modes``)."""
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or open(workdir / "torture.log", "a")
    rng = random.Random(seed)
    modes = [m for m in modes if m != "daemon" or daemon_available()]
    warps = make_warp_set(workdir / "warps", n=n_warps, seed=seed + 1)
    tally = Tally()
    try:
        for i, mode in enumerate(modes):
            target = kills * (i + 1) // len(modes)
            ref, t_fork = build_reference(mode, warps, workdir, commit_every, log)
            hits = count_hits(mode, warps, workdir, commit_every)
            if verbose:
                print(f"{mode}: reference run {t_fork:.2f} s; crash point hits per run {hits}",
                      flush=True)
            full = {"fork": t_fork * 1.2, "exec": t_fork * 1.2 + 3.0}
            points = CRASH_POINTS + (DAEMON_CRASH_POINTS if mode == "daemon" else ())
            while tally.kills < target:
                before = tally.kills
                episode(mode, warps, ref, workdir, rng, hits, full, tally,
                        min(kills_per_episode, target - tally.kills), exec_fraction,
                        commit_every, log, check_every_kill, points)
                if verbose:
                    print(f"  {mode} episode {tally.episodes}: {tally.kills - before} kills "
                          f"(total {tally.kills}), failures so far {len(tally.failures)}",
                          flush=True)
    finally:
        if own and not tally.failures:
            shutil.rmtree(workdir, ignore_errors=True)
    return tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=1000, help="SIGKILLs in total (default 1000)")
    ap.add_argument("--mode", choices=("ingest", "daemon", "both"), default="both")
    ap.add_argument("--workdir", help="keep everything here (default: a temporary directory, "
                                      "removed on success)")
    ap.add_argument("--warps", type=int, default=12, help="warps per episode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exec-fraction", type=float, default=0.1,
                    help="fraction of runs as a fresh 'python3 -m streamcoadd' (rest: fork)")
    ap.add_argument("--kills-per-episode", type=int, default=8)
    ap.add_argument("--commit-every", type=int, default=3)
    ap.add_argument("--no-check-every-kill", action="store_true")
    ap.add_argument("--json", help="write the tally here as JSON")
    args = ap.parse_args(argv)
    modes = ("ingest", "daemon") if args.mode == "both" else (args.mode,)
    if "daemon" in modes and not daemon_available():
        print("note: streamcoadd.service.daemon is not available in this checkout; ingest only")
    t0 = time.time()
    tally = torture(args.kills, modes, Path(args.workdir) if args.workdir else None, args.warps,
                    args.seed, args.exec_fraction, args.kills_per_episode, args.commit_every,
                    check_every_kill=not args.no_check_every_kill, verbose=True)
    summary = tally.summary()
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "failure_list": tally.failures}, indent=2))
    for f in tally.failures[:50]:
        print("FAIL", f)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
