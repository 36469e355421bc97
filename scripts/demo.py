#!/usr/bin/env python3
"""The main job on built-in demo data, as an operator would run it.

1. simulate a night of warps with GalSim (stars, galaxies, per-visit PSFs on a grid,
   detector gaps, bad columns, cosmic rays, saturation);
2. create a state and start the daemon (``streamcoadd watch``) on an inbox;
3. deliver the warps into the inbox one by one while the daemon runs (write ``.tmp``,
   rename), then re-deliver one (a duplicate) and a broken file (rejected with a reason);
4. when the daemon is idle it exits; finalize the coadds to FITS and draw a quick look;
5. finalize to Rubin ``CellCoadd`` files and a data butler, and open one with lsst-images
   (skipped with one line where lsst-images is not installed).

Everything goes to ``demo-output/`` (or ``--out``); run it again to start afresh.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sc(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamcoadd", *map(str, args)]
    print("$ streamcoadd " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=kw.pop("check", True), **kw)


def deliver(src: Path, inbox: Path) -> None:
    """Producers write under a temporary name and rename: the daemon never sees half a file."""
    tmp = inbox / (src.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.rename(inbox / src.name)


def open_in_rubin_tools(state: Path, out: Path) -> list[Path]:
    """finalize --format lsst-images --butler, then open one Rubin CellCoadd with
    lsst-images' own reader; one line and on when lsst is not installed."""
    sys.path.insert(0, str(ROOT))
    from streamcoadd.core.errors import UserError
    from streamcoadd.io.lsst_images import require_lsst, summary_line

    try:
        require_lsst()
    except UserError as e:
        print(f"Rubin CellCoadd skipped: {e}", flush=True)
        return []
    shutil.rmtree(out / "cellcoadds", ignore_errors=True)
    shutil.rmtree(out / "butler", ignore_errors=True)
    sc("finalize", state, "--out", out / "cellcoadds", "--format", "lsst-images",
       "--butler", out / "butler")
    files = sorted((out / "cellcoadds").glob("*_cellcoadd.fits"))
    if files:
        print("CellCoadd.read: " + summary_line(files[0]), flush=True)
    return [*files, out / "butler"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo-output"))
    ap.add_argument("--visits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.5, help="s between deliveries")
    args = ap.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    sim, state, inbox = out / "sim", out / "state", out / "inbox"
    inbox.mkdir(parents=True)

    sc("simulate", sim, "--visits", args.visits, "--seed", args.seed)
    sc("init", state, "--skymap", sim / "skymap.toml")
    log = open(out / "daemon.log", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "streamcoadd", "watch", state, "--inbox", inbox,
         "--done", out / "done", "--rejected", out / "rejected", "--until-idle", "4",
         "--commit-interval", "2", "--commit-every", "4"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"daemon started (pid {daemon.pid}); log: {out / 'daemon.log'}", flush=True)

    warps = sorted((sim / "warps").glob("*.fits"))
    for i, w in enumerate(warps, 1):
        time.sleep(args.interval)
        deliver(w, inbox)
        print(f"  delivered {w.name} ({i}/{len(warps)})", flush=True)
    time.sleep(args.interval)
    shutil.copyfile(warps[0], inbox / ("again-" + warps[0].name))  # a duplicate: folded once
    broken = inbox / "broken.fits"
    broken.write_bytes(warps[1].read_bytes()[:50000])  # truncated in transit
    print("  delivered a duplicate and a truncated file", flush=True)
    code = daemon.wait(timeout=600)
    log.close()
    print(f"daemon exited with status {code}", flush=True)
    print((out / "daemon.log").read_text()[-1500:])

    sc("status", state)
    sc("finalize", state, "--out", out / "coadds")
    cellcoadds = open_in_rubin_tools(state, out)
    looks = []
    for patch in ("0,0", "1,0", "0,1", "1,1"):
        png = out / f"quicklook_{patch.replace(',', '-')}.png"
        r = sc("plot", "quicklook", state, "--patch", patch, "--out", png, check=False,
               capture_output=True, text=True)
        if r.returncode == 0:
            looks.append(png)
    for kind in ("depth", "psf"):
        png = out / f"{kind}.png"
        if sc("plot", kind, state, "--out", png, check=False).returncode == 0:
            looks.append(png)
    for reason in sorted((out / "rejected").glob("*.reason")):
        print(f"rejected {reason.stem}: {reason.read_text().strip()}")
    print("\nOutputs:")
    for f in sorted((out / "coadds").glob("*.fits")):
        print(f"  {f}")
    for f in cellcoadds:
        print(f"  {f}")
    for f in looks:
        print(f"  {f}")
    print(f"  state: {state}  (read it with streamcoadd.open_state; see docs/analysis.md)")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
