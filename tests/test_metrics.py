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


def test_throughput_window_matches_what_was_folded(tmp_path):
    """warps/s and input Mpix/s over the sliding windows (status file, metrics, `status`):
    the counts and pixel sums equal what was folded, and each rate is its window's count
    over its span. No timing is asserted."""
    import itertools
    import json

    tract = load_skymap(SKYMAP).tract(0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    psf = np.zeros((5, 5))
    psf[2, 2] = 1
    shapes = [(100, 100)] * 3 + [(60, 100)] * 3  # (ny, nx): each fully covers two cells
    for v, shape in enumerate(shapes):
        write_warp(inbox / f"v{v}.fits", tract=tract, xy0=(0, 0),
                   image=np.full(shape, v, np.float32), mask=np.zeros(shape, np.int32),
                   variance=np.ones(shape, np.float32), psf=psf, visit=v, detector=0, band="r")
    (inbox / "junk.fits").write_bytes(b"not fits")  # rejected: not in the throughput
    state = tmp_path / "state"
    cfg = tmp_path / "settings.toml"
    cfg.write_text("[daemon]\nthroughput_window = 3600.0\nthroughput_warps = 4\n"
                   "[run]\ncommit_every = 2\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, a)],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run("init", state, "--skymap", SKYMAP).returncode == 0
    prom = tmp_path / "streamcoadd.prom"
    r = run("watch", state, "--inbox", inbox, "--until-idle", "1", "--stable-seconds", "0.2",
            "--metrics-file", prom, "--config", cfg)
    assert r.returncode == 0, r.stderr
    st = json.loads((state / "daemon-status.json").read_text())
    t = st["throughput"]
    pixels = [ny * nx for ny, nx in shapes]
    assert st["counts"]["folded"] == len(shapes) == t["folded_warps_total"]
    assert abs(t["input_mpix_total"] - sum(pixels) / 1e6) < 1e-9
    tw, ww = t["time_window"], t["warp_window"]
    assert tw["seconds"] == 3600.0 and tw["warps"] == len(shapes)  # all within the hour
    assert abs(tw["input_mpix"] - sum(pixels) / 1e6) < 1e-9
    assert ww["size"] == 4 and ww["warps"] == 4
    assert any(abs(ww["input_mpix"] - sum(c) / 1e6) < 1e-9
               for c in itertools.combinations(pixels, 4))
    for w in (tw, ww):
        assert w["span_s"] > 0
        assert abs(w["warps_per_s"] - w["warps"] / w["span_s"]) <= 1e-5 * w["warps_per_s"] + 1e-6
        assert abs(w["input_mpix_per_s"] - w["input_mpix"] / w["span_s"]) \
            <= 1e-5 * w["input_mpix_per_s"] + 1e-6
    # the window of the last 4 warps ends at the last commit: never a longer span than
    # the daemon's whole life
    assert ww["span_s"] <= st["uptime_s"] + 0.1
    m = parse(prom.read_text())
    lab = f'state_dir="{state.absolute()}"'
    for w, name in ((tw, '3600s'), (ww, '4warps')):
        got = m[f'streamcoadd_throughput_warps_per_second{{{lab},window="{name}"}}']
        assert abs(got - w["warps_per_s"]) <= 1e-5 * w["warps_per_s"]
        got = m[f'streamcoadd_throughput_input_mpix_per_second{{{lab},window="{name}"}}']
        assert abs(got - w["input_mpix_per_s"]) <= 1e-5 * w["input_mpix_per_s"]
    assert abs(m[f"streamcoadd_input_mpix_total{{{lab}}}"] - sum(pixels) / 1e6) < 1e-6
    out = run("status", state)
    assert out.returncode == 0 and "input Mpix/s over the last 3600 s" in out.stdout, out.stdout
