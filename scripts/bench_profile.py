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

# (category, function-name pattern); the innermost matching frame decides.
RULES = [
    ("commit: fsync (cells, dirs, manifest)", r"^(fsync_file|fsync_dir)$"),
    ("commit: ledger (sqlite)", r"^Ledger\."),
    ("commit: HDF5 write (h5py, fletcher32)", r"^write_cell_file$"),
    ("commit: unlink superseded, manifest json", r"^StateStore\._write_shard$"),
    ("commit: cache trim / other", r"^StateStore\.commit$"),
    ("load accumulators from HDF5 (cache miss)", r"^read_cell_file$"),
    ("allocate new accumulators (zeros)", r"^CellSums\.zeros$"),
    ("read: sha256 content hash", r"^file_hash$"),
    ("read: file bytes", r"^_read_bytes$"),
    ("validate: WCS check", r"^_check_wcs$"),
    ("validate: finite/positive pixel checks", r"^_check_good_pixels$"),
    ("read: mask remap to canonical bits", r"^remap_to_canonical$"),
    ("read: FITS parse + byteswap (astropy)", r"^(read_warp|_parse)$"),
    ("weight: sigma_clipped_stats", r"^warp_weight$"),
    ("interpolate bad pixels", r"^interpolate_bad_pixels$"),
    ("prepare: or_mask, planes", r"^prepare_warp$"),
    ("PSF moments", r"^psf_moments$"),
    ("accumulate: per-bit mask counts (retraction)", r"^accumulate_pixels$@bits"),
    ("accumulate: float64 sums (w, wI, w2var, interp, SAT)", r"^accumulate_pixels$"),
    ("fold_cell: PSF stamp, contributor row", r"^fold_cell$"),
    ("overlap rule (cell_input)", r"^cell_input$"),
    ("submit: planning, dedupe, other", r"^Ingestor\._submit$"),
    ("ingest loop / progress / other", r"^(Ingestor\.|cmd_ingest)"),
]

FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def parse_frame(s):
    m = FRAME.match(s.strip())
    if not m:
        return s.strip(), "", 0
    return m["fn"], m["file"], int(m["line"] or 0)


def accumulate_bit_lines():
    """Source lines of accumulate_pixels that maintain the per-bit counts / mask OR."""
    src = (ROOT / "streamcoadd" / "fold.py").read_text().splitlines()
    lines = set()
    inside = False
    for i, line in enumerate(src, 1):
        if line.startswith("def accumulate_pixels"):
            inside = True
            continue
        if inside and line.startswith("def "):
            break
        if inside and ("or_mask" in line or "bit" in line or "mask_or" in line):
            lines.add(i)
    return lines


def analyse(raw: str) -> dict:
    bit_lines = accumulate_bit_lines()
    cats = Counter()
    lines = Counter()
    hot = {"accumulate_pixels": Counter(), "write_cell_file": Counter(),
           "interpolate_bad_pixels": Counter(), "prepare_warp": Counter()}
    total = 0
    for row in raw.splitlines():
        if not row.strip():
            continue
        stack, _, n = row.rpartition(" ")
        n = int(n)
        frames = [parse_frame(f) for f in stack.split(";")]
        if not any(fn == "cmd_ingest" for fn, _, _ in frames):
            continue  # other threads (RSS sampler) and interpreter start-up
        total += n
        cat = None
        for fn, file, line in reversed(frames):
            for name, pat in RULES:
                if pat.endswith("@bits"):
                    if re.match(pat[:-5], fn) and file.endswith("fold.py") and line in bit_lines:
                        cat = name
                        break
                elif re.match(pat, fn):
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
