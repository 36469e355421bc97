"""``streamcoadd verify``: deliberately damaged states are diagnosed, with what to do."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torture
from common import ROOT

from streamcoadd.analysis.verify import verify_state
from streamcoadd.cli.main import main
from streamcoadd.core.warp import file_hash


@pytest.fixture(scope="module")
def clean_state(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    warps = torture.make_warp_set(d / "warps", n=5, seed=21)
    st = d / "state"
    torture._quiet(main, ["init", str(st), "--skymap", str(torture.SKYMAP)])
    assert torture._quiet(main, ["ingest", str(st), *map(str, warps), "--quiet",
                                 "--commit-every", "2"]) == 0
    return st, warps


@pytest.fixture
def state(clean_state, tmp_path):
    st, warps = clean_state
    copy = tmp_path / "state"
    shutil.copytree(st, copy)
    return copy, warps


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return p.returncode, p.stdout + p.stderr


def a_cell(st: Path) -> Path:
    m = sorted((st / "shards").glob("t*/p*/*/manifest.json"))[0]
    d = json.loads(m.read_text())
    k, g = sorted(d["cells"].items())[0]
    return m.parent / f"c{k}.g{g}.h5"


def kinds(st):
    return {p.kind for p in verify_state(st)}


def test_clean_state_is_clean(state):
    st, _ = state
    assert verify_state(st) == []
    rc, out = cli("verify", st)
    assert rc == 0, out
    assert "OK" in out


def test_flipped_bytes_in_a_dataset_fail_the_checksum(state):
    st, _ = state
    cell = a_cell(st)
    with h5py.File(cell, "r") as f:
        ds = f["good.f8"]  # the stacked dense planes of the good group (state format 2)
        off = ds.id.get_offset() + 1000
    data = bytearray(cell.read_bytes())
    data[off] ^= 0xFF
    data[off + 1] ^= 0x55
    cell.write_bytes(bytes(data))
    problems = verify_state(st)
    assert [p.kind for p in problems] == ["cell-corrupt"]
    p = problems[0]
    assert p.severity == "error" and str(cell) == p.path
    assert "mv " in p.action and "streamcoadd ingest" in p.action and "DELETE FROM warps" in p.action
    rc, out = cli("verify", st)
    assert rc == 1
    assert "cell-corrupt" in out and "what to do:" in out


def test_flipped_bytes_in_metadata(state):
    st, _ = state
    cell = a_cell(st)
    data = bytearray(cell.read_bytes())
    for i in range(0, 64):  # the superblock
        data[i] ^= 0xA5
    cell.write_bytes(bytes(data))
    assert kinds(st) == {"cell-corrupt"}


def test_truncated_cell_file(state):
    st, _ = state
    cell = a_cell(st)
    cell.write_bytes(cell.read_bytes()[: cell.stat().st_size // 2])
    assert kinds(st) == {"cell-corrupt"}


def test_deleted_cell_file(state):
    st, _ = state
    cell = a_cell(st)
    cell.unlink()
    problems = verify_state(st)
    assert [p.kind for p in problems] == ["cell-missing"]
    assert "restore the shard directory from a backup" in problems[0].action


def test_bad_json_manifest(state):
    st, _ = state
    m = sorted((st / "shards").glob("t*/p*/*/manifest.json"))[0]
    m.write_text(m.read_text()[:-20])
    problems = verify_state(st)
    assert "manifest-corrupt" in {p.kind for p in problems}
    rc, out = cli("verify", st)
    assert rc == 1 and "manifest-corrupt" in out
    assert "Traceback" not in out


def test_manifest_with_wrong_fields(state):
    st, _ = state
    m = sorted((st / "shards").glob("t*/p*/*/manifest.json"))[0]
    d = json.loads(m.read_text())
    d["cells"]["99-0"] = 1
    m.write_text(json.dumps(d))
    assert "manifest-corrupt" in kinds(st)
    d.pop("cells")
    m.write_text(json.dumps(d))
    assert "manifest-corrupt" in kinds(st)


def test_contributor_not_in_manifest(state):
    st, warps = state
    m = sorted((st / "shards").glob("t*/p*/*/manifest.json"))[0]
    d = json.loads(m.read_text())
    h = sorted(d["warps"])[0]
    del d["warps"][h]
    m.write_text(json.dumps(d))
    assert "contributor-not-in-manifest" in kinds(st)


def test_debris_is_benign_and_repairable(state):
    st, _ = state
    cell = a_cell(st)
    (cell.parent / (cell.name + ".tmp")).write_bytes(b"partial")
    shutil.copyfile(cell, cell.parent / "c7-7.g999.h5")
    (st / "state.json.tmp").write_text("{")
    problems = verify_state(st)
    assert {p.kind for p in problems} == {"debris"}
    assert {p.severity for p in problems} == {"benign"}
    assert len(problems) == 3
    rc, out = cli("verify", st)
    assert rc == 1 and "next 'streamcoadd ingest' or 'watch' removes it" in out
    rc, out = cli("verify", st, "--repair")
    assert "removed 3 debris file(s)" in out and rc == 0
    assert verify_state(st) == []


def test_debris_of_a_running_writer_is_not_reported(state):
    from streamcoadd.store.state import StateStore

    st, _ = state
    cell = a_cell(st)
    with StateStore.open(st, write=True):  # holds the writer lock, like a running daemon
        (cell.parent / "c7-7.g999.h5.tmp").write_bytes(b"being written")
        assert verify_state(st) == []
        rc, out = cli("verify", st)
        assert rc == 0 and "a writer (pid" in out
    assert kinds(st) == {"debris"}


def test_missing_ledger_row_is_benign_and_fixed_by_ingest(state):
    st, warps = state
    h = file_hash(warps[0].read_bytes())
    db = sqlite3.connect(st / "ledger.sqlite")
    db.execute("DELETE FROM warps WHERE content_hash = ?", (h,))
    db.commit()
    db.close()
    problems = verify_state(st)
    assert [(p.kind, p.severity) for p in problems] == [("ledger-row-missing", "benign")]
    assert "without folding it again" in problems[0].action
    before = {p: p.read_bytes() for p in (st / "shards").rglob("*") if p.is_file() and p.name != "shard.lock"}
    assert torture._quiet(main, ["ingest", str(st), str(warps[0]), "--quiet"]) == 0
    assert verify_state(st) == []
    after = {p: p.read_bytes() for p in (st / "shards").rglob("*") if p.is_file() and p.name != "shard.lock"}
    assert before == after  # recorded, not folded again


def test_ledger_row_without_shard_is_an_error(state):
    st, warps = state
    db = sqlite3.connect(st / "ledger.sqlite")
    db.execute("INSERT INTO warps VALUES (?,?,?,?,?,?,?,?,?,?)",
               ("f" * 64, 0, 77, 1, "r", "/nowhere/w.fits", "folded", 4, 1.0, 0.0))
    db.commit()
    db.close()
    problems = verify_state(st)
    assert [p.kind for p in problems] == ["ledger-warp-lost"]
    assert "DELETE FROM warps WHERE content_hash='" + "f" * 64 in problems[0].action


def test_wrong_ledger_count(state):
    st, warps = state
    db = sqlite3.connect(st / "ledger.sqlite")
    db.execute("UPDATE warps SET n_cells = n_cells + 3 WHERE status = 'folded'")
    db.commit()
    db.close()
    assert kinds(st) == {"ledger-count-mismatch"}


def test_corrupt_ledger(state):
    st, _ = state
    lp = st / "ledger.sqlite"
    for extra in ("-wal", "-shm"):
        Path(str(lp) + extra).unlink(missing_ok=True)
    data = bytearray(lp.read_bytes())
    data[:100] = b"\0" * 100
    lp.write_bytes(bytes(data))
    problems = verify_state(st)
    assert "ledger-corrupt" in {p.kind for p in problems}
    rc, out = cli("verify", st)
    assert rc == 1 and "Traceback" not in out


def test_missing_state_json(state):
    st, _ = state
    (st / "state.json").unlink()
    assert kinds(st) == {"no-state"}
    rc, out = cli("verify", st)
    assert rc == 1


def test_json_output(state):
    st, _ = state
    a_cell(st).unlink()
    rc, out = cli("verify", st, "--json")
    assert rc == 1
    found = json.loads(out)
    assert found[0]["kind"] == "cell-missing" and found[0]["action"]
