"""Where ingest time goes: run ``scripts/bench_ingest.py`` (the CLI ingest) under py-spy
(``--idle``, so time blocked in fsync and reads counts) and attribute every sample of the
main thread to one category, by the innermost frame that matches a rule below.

    python3 scripts/bench_profile.py STATE WARPDIR --json J [--rate 100]
    python3 scripts/bench_profile.py --parse RAW.txt --json J     (re-analyse a recording)

Also lists the hottest source lines (self time) of the main thread, and of
``accumulate_pixels`` / ``write_cell_file`` in particular.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (category, function-name pattern, source-line pattern or None); the innermost frame
# that matches decides. Line patterns look at the text of the source line being run.
RULES = [
    ("commit: fsync (cells, dirs, manifest)", r"^(fsync_file|fsync_dir)$", None),
    ("commit: ledger (sqlite)", r"^Ledger\.", None),
    ("commit: CRC-32 of datasets", r"^_dataset$", r"crc32"),
    ("commit: sparse/constant plane encoding", r"^encode_plane$", None),
    ("commit: write file bytes", r"^write_cell_file$", r"\.write\("),
    ("commit: HDF5 encode (h5py)", r"^(write_cell_file|_dataset|_attr|_plane)$", None),
    ("commit: waiting for the second writer process", r"^write_cells_parallel$", None),
    ("commit: unlink superseded, manifest json",
     r"^StateStore\._(write_shard|finish_shard|plan_shard)$", None),
    ("commit: cache trim / other", r"^StateStore\.commit$", None),
    ("load accumulators from HDF5 (cache miss)",
     r"^(read_cell_file|_read_group|_read_did|_attrs_of)$", None),
    ("allocate new accumulators (zeros)", r"^(CellSums\.zeros|CellSums\.plane_zeros)$", None),
    ("waiting for the loader thread (next warp not ready)", r"^WarpLoader\.take$", None),
    ("read: sha256 content hash", r"^file_hash$", None),
    ("read: file bytes", r"^read_bytes$", None),
    ("validate: WCS check", r"^_check_wcs$", None),
    ("validate: finite/positive pixel checks", r"^_check_good_pixels$", None),
    ("read: mask remap to canonical bits", r"^remap_to_canonical$", None),
    ("read: FITS parse + byteswap (astropy)", r"^(read_warp|_parse)$", None),
    ("weight: sigma clipping", r"^(warp_weight|_median_in_place)$", None),
    ("interpolate bad pixels", r"^interpolate_bad_pixels$", None),
    ("prepare: or_mask, planes", r"^prepare_warp$", None),
    ("PSF moments", r"^psf_moments$", None),
    ("accumulate: per-bit mask counts, mask OR", r"^accumulate_pixels$",
     r"or_mask|bit|mask_bits"),
    ("accumulate: interpolated-weight plane", r"^accumulate_pixels$", r"interp"),
    ("accumulate: float64 sums (w, wI, w2var, SAT)", r"^(accumulate_pixels|_add_product)$",
     None),
    ("fold_cell: PSF stamp, contributor row", r"^fold_cell$", None),
    ("overlap rule (cell_input)", r"^cell_input$", None),
    ("submit: planning, dedupe, other", r"^(Ingestor\._submit|fold_into_shard|shard_inputs)$",
     None),
    ("ingest loop / progress / other", r"^(Ingestor\.|cmd_ingest)", None),
    ("loader thread: other", r"^load_warp$", None),
]

_SRC: dict[str, list[str]] = {}


def source_line(file: str, line: int) -> str:
    if file not in _SRC:
        p = ROOT / file
        _SRC[file] = p.read_text().splitlines() if p.exists() else []
    lines = _SRC[file]
    return lines[line - 1] if 0 < line <= len(lines) else ""


# the same for ``streamcoadd finalize --patch`` (frames under cmd_finalize)
FINALIZE_RULES = [
    ("read cell files: CRC-32 check", r"^_read_did$", r"crc32"),
    ("read cell files: HDF5 reads and attributes",
     r"^(_read_did|_attrs_of|_read|_read_group|read_cell_file|_plane_at|_optional_at)$", None),
    ("read cell files: contributors", r"^contributors_from_array", None),
    ("manifests", r"^StateStore\.read_manifest$", None),
    ("coadd: image/variance/mask math", r"^coadd_planes$", None),
    ("write: pwrite of rows and strips", r"^_pwrite_all$", None),
    ("write: tables and headers", r"^(_tables_bytes|_visit_rows|_hbytes|_hdul_headers)$", None),
    ("per-cell strip handling", r"^_finalize_strip$", None),
    ("CLI / waiting for workers / other", r"^(cmd_finalize|finalize_patch)$", None),
]

FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def parse_frame(s):
    m = FRAME.match(s.strip())
    if not m:
        return s.strip(), "", 0
    return m["fn"], m["file"], int(m["line"] or 0)


def analyse(raw: str, rules=None, root_fn="cmd_ingest") -> dict:
    cats = Counter()
    lines = Counter()
    hot = {"accumulate_pixels": Counter(), "write_cell_file": Counter(), "_dataset": Counter(),
           "interpolate_bad_pixels": Counter(), "prepare_warp": Counter()}
    total = 0
    for row in raw.splitlines():
        if not row.strip():
            continue
        stack, _, n = row.rpartition(" ")
        n = int(n)
        frames = [parse_frame(f) for f in stack.split(";")]
        names = {fn for fn, _, _ in frames}
        if root_fn not in names:
            continue  # other threads (RSS sampler) and interpreter start-up
        if root_fn == "load_warp" and "cmd_ingest" in names:
            continue  # a load on the main thread is the main thread's
        total += n
        cat = None
        for fn, file, line in reversed(frames):
            for name, pat, line_pat in rules or RULES:
                if re.match(pat, fn) and (line_pat is None
                                          or re.search(line_pat, source_line(file, line))):
                    cat = name
                    break
            if cat:
                break
        cats[cat or "other"] += n
        fn, file, line = frames[-1]
        lines[f"{fn} ({file}:{line})"] += n
        for fn2, file2, line2 in reversed(frames):
            if fn2 in hot and "streamcoadd" in file2:
                hot[fn2][f"{file2}:{line2}"] += n
                break
    return dict(samples=total,
                categories=[(k, v, v / total if total else 0) for k, v in cats.most_common()],
                top_leaf_lines=[(k, v / total) for k, v in lines.most_common(25)],
                hot_lines={k: [(kk, vv / total) for kk, vv in c.most_common(8)]
                           for k, c in hot.items()})


def record(state, warpdir, out_raw, rate=100):
    if not shutil.which("py-spy"):
        return None
    cmd = ["py-spy", "record", "--idle", "-r", str(rate), "-f", "raw", "-o", str(out_raw),
           "--", sys.executable, str(ROOT / "scripts" / "bench_ingest.py"), str(state),
           str(warpdir), "--json", str(Path(out_raw).with_suffix(".ingest.json"))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not Path(out_raw).exists():
        raise RuntimeError(f"py-spy failed: {r.stderr[-2000:]}")
    return Path(out_raw).read_text()


def record_finalize(state, patch, out_dir, out_raw, rate=100):
    """py-spy on ``streamcoadd finalize STATE --patch X,Y``, cold (shard files evicted)."""
    if not shutil.which("py-spy"):
        return None
    from bench_finalize import evict

    evict(Path(state) / "shards")
    cmd = ["py-spy", "record", "--idle", "--subprocesses", "-r", str(rate), "-f", "raw",
           "-o", str(out_raw),
           "--", sys.executable, "-m", "streamcoadd", "finalize", str(state), "--out",
           str(out_dir), "--patch", patch]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0 or not Path(out_raw).exists():
        raise RuntimeError(f"py-spy failed: {r.stderr[-2000:]}")
    return analyse(Path(out_raw).read_text(), FINALIZE_RULES, "cmd_finalize")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state", nargs="?")
    ap.add_argument("warpdir", nargs="?")
    ap.add_argument("--json", required=True)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--parse")
    a = ap.parse_args(argv)
    if a.parse:
        raw = Path(a.parse).read_text()
    else:
        raw = record(a.state, a.warpdir, Path(a.json).with_suffix(".raw.txt"), a.rate)
        if raw is None:
            Path(a.json).write_text(json.dumps(dict(skipped="py-spy not installed")))
            return
    res = analyse(raw)
    Path(a.json).write_text(json.dumps(res, indent=1))
    for k, v, f in res["categories"]:
        print(f"{100 * f:5.1f}%  {k}")


if __name__ == "__main__":
    main()
