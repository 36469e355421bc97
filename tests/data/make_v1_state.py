"""Make ``tests/data/v1_state.tar.gz``: a small state of format 1, written by the streamcoadd
release before format 2 (commit ab64495), for the read-compatibility and migration tests.

Run from the repository root with that release importable and any Python it supports::

    git worktree add /tmp/v1 ab64495   # (or any checkout of that commit)
    PYTHONPATH=/tmp/v1 python tests/data/make_v1_state.py

The warps come from ``scripts/torture.py``'s generator (partial coverage, NO_DATA stripes,
BAD and SAT pixels, fallback inputs, two bands), written by this checkout's warp writer, so
the old release is used only to ingest them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> int:
    old = os.environ.get("PYTHONPATH")
    if not old:
        print("set PYTHONPATH to a checkout of commit ab64495 (see the docstring)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = ("import sys; sys.path.insert(0, 'scripts'); import torture; "
               f"torture.make_warp_set({str(tmp / 'warps')!r}, n=10, seed=3)")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-c", gen], cwd=ROOT, env=env, check=True)
        st = tmp / "v1_state"
        skymap = ROOT / "config" / "skymap-demo.toml"
        env = dict(os.environ, PYTHONPATH=old)
        subprocess.run([sys.executable, "-m", "streamcoadd", "init", str(st), "--skymap",
                        str(skymap)], env=env, check=True, cwd=tmp)
        warps = sorted(map(str, (tmp / "warps").glob("*.fits")))
        subprocess.run([sys.executable, "-m", "streamcoadd", "ingest", str(st), *warps,
                        "--quiet", "--commit-every", "3"], env=env, check=True, cwd=tmp)
        print(subprocess.run([sys.executable, "-c", "import streamcoadd; "
                              "print(streamcoadd.__file__)"], env=env, cwd=tmp,
                             capture_output=True, text=True).stdout.strip())
        for p in [st / "lock", *st.glob("*-shm"), *st.glob("*-wal")]:
            p.unlink(missing_ok=True)
        out = HERE / "v1_state.tar.gz"
        with tarfile.open(out, "w:gz") as tar:
            tar.add(st, arcname="v1_state", filter=_strip)
        print(f"{out}: {out.stat().st_size} bytes")
    return 0


def _strip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.name.endswith(("lock", "shard.lock")):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


if __name__ == "__main__":
    sys.exit(main())
