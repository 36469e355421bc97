"""Time and peak memory of ``finalize --format lsst-images`` for one LSST-size patch.

Builds (once, in WORKDIR) a state on an LSST-like skymap with N patch-sized warps from
``scripts/bench_gen.py`` covering patch (2, 2) of tract 9813 (484 cells of 150 px; the
CellCoadd holds the 22 x 22 inner cells, 3300 x 3300 px), then runs the export for each
compression in a fresh process and prints one table row per run: export wall time (the
command without the interpreter's imports), the process's peak RSS, the file size.

Usage::

    python scripts/bench_export.py [--workdir DIR] [--n 4] [--skymap lsst|lsst-v2]
        [--noise 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKYMAPS = {"lsst": ROOT / "config" / "skymap-lsst.toml",
           "lsst-v2": ROOT / "config" / "skymap-lsst-v2.toml"}
# one export in a fresh interpreter: imports first (not timed), then the command
RUNNER = """
import json, resource, sys, time
from streamcoadd.cli.main import main
import lsst.images.cells, lsst.daf.butler  # the imports are not the export
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rc = main(sys.argv[1:])
t1 = time.perf_counter()
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(rc=rc, s=t1 - t0, rss0_mb=r0 / 1024, rss_mb=r1 / 1024)))
"""


def cli(*args) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], check=True,
                   env=env, cwd=ROOT)


def build_state(work: Path, n: int, skymap: Path, noise: int) -> Path:
    st = work / f"state-{skymap.stem}-n{n}-k{noise}"
    if st.exists():
        return st
    warps = work / f"warps-n{n}"
    if not warps.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gen.py"), str(warps),
                        "--n", str(n)], check=True, cwd=ROOT)
    cfg = work / "fold.toml"
    cfg.write_text(f"[fold]\nnoise_realizations = {noise}\n")
    cli("init", st, "--skymap", skymap, "--config", cfg)
    cli("ingest", st, "--quiet", warps)
    return st


def export(st: Path, out: Path, compression: str, butler: Path | None) -> dict:
    args = ["finalize", str(st), "--out", str(out), "--patch", "2,2",
            "--format", "lsst-images", "--compression", compression]
    if butler is not None:
        args += ["--butler", str(butler)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=True)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["file_mb"] = sum(f.stat().st_size for f in out.glob("*.fits")) / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--n", type=int, default=4, help="warps covering the patch")
    ap.add_argument("--skymap", choices=sorted(SKYMAPS), default="lsst")
    ap.add_argument("--noise", type=int, default=0,
                    help="noise realizations (bench_gen's warps carry none: keep 0)")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_export."))
    work.mkdir(parents=True, exist_ok=True)
    st = build_state(work, a.n, SKYMAPS[a.skymap], a.noise)
    print(f"state {st}: {a.n} warps, skymap {a.skymap}, {a.noise} noise realization(s)")
    print("| compression | butler | export s | peak RSS MB (after imports) | file MB |")
    print("|---|---|---|---|---|")
    runs = [("lossless", False), ("none", False), ("lossy16", False), ("lossless", True)]
    for i, (comp, with_butler) in enumerate(runs):
        out = work / f"out-{i}"
        for f in out.glob("*"):
            f.unlink()
        r = export(st, out, comp, work / f"repo-{i}" if with_butler else None)
        print(f"| {comp} | {'yes' if with_butler else 'no'} | {r['s']:.1f} | "
              f"{r['rss_mb']:.0f} ({r['rss0_mb']:.0f}) | {r['file_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
