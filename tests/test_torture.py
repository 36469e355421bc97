"""Short kill -9 torture run (the full one is ``python3 scripts/torture.py --kills 1000``).

At least 30 SIGKILLs of ``streamcoadd ingest`` (and of ``streamcoadd watch`` when the daemon
is in this checkout) at random instants and at every named crash point; after each kill the
state must be consistent (only benign findings), and at the end it must equal an
uninterrupted run exactly (contributors) and to 1e-10 (sums), without debris.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _torture():
    spec = importlib.util.spec_from_file_location("torture", ROOT / "scripts" / "torture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", mod)
    spec.loader.exec_module(mod)
    return mod


torture = _torture()


def test_every_crash_point_then_random_kills(tmp_path):
    modes = ("ingest", "daemon") if torture.daemon_available() else ("ingest",)
    tally = torture.torture(kills=32, modes=modes, workdir=tmp_path, n_warps=6, seed=11,
                            exec_fraction=0.05, kills_per_episode=8, commit_every=2)
    summary = tally.summary()
    print(summary)
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.kills >= 30
    # both kinds of kill happened, and most named crash points were hit
    assert tally.kills_by["random"] >= 3
    assert len([k for k in tally.kills_by if k != "random"]) >= 5


def test_compare_states_detects_a_double_count(tmp_path):
    """The checkers themselves: forget that a warp was folded (drop it from every manifest
    and the ledger) and ingest it again -- it is then counted twice, and both the
    comparison with the reference and ``verify`` must say so."""
    import json
    import sqlite3

    from streamcoadd.analysis.verify import verify_state
    from streamcoadd.cli.main import main
    from streamcoadd.core.warp import file_hash

    warps = torture.make_warp_set(tmp_path / "w", n=4, seed=3)
    sm = str(torture.SKYMAP)
    for name in ("a", "b"):
        torture._quiet(main, ["init", str(tmp_path / name), "--skymap", sm])
        torture._quiet(main, ["ingest", str(tmp_path / name), *map(str, warps), "--quiet"])
    assert torture.compare_states(tmp_path / "a", tmp_path / "b") == []
    h = file_hash(warps[0].read_bytes())
    for m in (tmp_path / "b" / "shards").glob("t*/p*/*/manifest.json"):
        d = json.loads(m.read_text())
        d["warps"].pop(h, None)
        m.write_text(json.dumps(d))
    db = sqlite3.connect(tmp_path / "b" / "ledger.sqlite")
    db.execute("DELETE FROM warps WHERE content_hash = ?", (h,))
    db.commit()
    db.close()
    torture._quiet(main, ["ingest", str(tmp_path / "b"), str(warps[0]), "--quiet"])
    problems = torture.compare_states(tmp_path / "a", tmp_path / "b")
    assert any("more than once" in p for p in problems)
    assert any("sum_w differs" in p for p in problems)
    kinds = {p.kind for p in verify_state(tmp_path / "b")}
    assert "duplicate-contributor" in kinds


def test_hygiene_flags_debris(tmp_path):
    from streamcoadd.cli.main import main

    warps = torture.make_warp_set(tmp_path / "w", n=3, seed=4)
    st = tmp_path / "s"
    torture._quiet(main, ["init", str(st), "--skymap", str(torture.SKYMAP)])
    torture._quiet(main, ["ingest", str(st), *map(str, warps), "--quiet"])
    assert torture.hygiene(st) == []
    shard = next((st / "shards").glob("t*/p*/*"))
    (shard / "c0-0.g99.h5.tmp").write_bytes(b"x")
    (shard / "c1-1.g98.h5").write_bytes(b"junk")
    found = torture.hygiene(st)
    assert any("stray temporary" in p for p in found)
    assert any("no manifest names" in p for p in found)
    assert any("unreadable HDF5" in p for p in found)


@pytest.mark.slow
def test_long_torture(tmp_path, request):
    if not request.config.getoption("--runslow", default=False):
        pytest.skip("long torture run: use --runslow or scripts/torture.py")
    tally = torture.torture(kills=300, workdir=tmp_path, seed=5)
    assert not tally.failures, "\n".join(tally.failures[:20])
