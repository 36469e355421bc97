"""The daemon's Prometheus text-file export (real daemon subprocess, real files)."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from streamcoadd.core.skymap import load_skymap
from streamcoadd.io.warp_writer import write_warp

ROOT = Path(__file__).resolve().parent.parent
SKYMAP = ROOT / "config" / "skymap-demo.toml"


def parse(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_file_counts_what_the_daemon_did(tmp_path):
    tract = load_skymap(SKYMAP).tract(0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    psf = np.zeros((5, 5))
    psf[2, 2] = 1
    for v in range(3):
        write_warp(inbox / f"v{v}.fits", tract=tract, xy0=(0, 0),
                   image=np.full((100, 100), v, np.float32), mask=np.zeros((100, 100), np.int32),
                   variance=np.ones((100, 100), np.float32), psf=psf, visit=v, detector=0,
                   band="r")
    (inbox / "junk.fits").write_bytes(b"not fits")
    state = tmp_path / "state"
    run = lambda *a: subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, a)],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run("init", state, "--skymap", SKYMAP).returncode == 0
    prom = tmp_path / "streamcoadd.prom"
    r = run("watch", state, "--inbox", inbox, "--until-idle", "1", "--stable-seconds", "0.2",
            "--metrics-file", prom)
    assert r.returncode == 0, r.stderr
    m = parse(prom.read_text())
    lab = f'state_dir="{state.absolute()}"'
    assert m[f'streamcoadd_warps_total{{{lab},outcome="folded"}}'] == 3
    assert m[f'streamcoadd_warps_total{{{lab},outcome="rejected"}}'] == 1
    assert m[f"streamcoadd_commits_total{{{lab}}}"] >= 1
    assert m[f"streamcoadd_fold_seconds_count{{{lab}}}"] == 3
    assert m[f"streamcoadd_fold_seconds_sum{{{lab}}}"] > 0
    # every cell file and manifest the daemon wrote is counted
    on_disk = sum(f.stat().st_size for f in (state / "shards").rglob("*") if f.is_file()
                  and f.suffix in (".h5", ".json"))
    assert m[f"streamcoadd_bytes_written_total{{{lab}}}"] >= on_disk
    assert m[f"streamcoadd_up{{{lab}}}"] == 0  # it has stopped
