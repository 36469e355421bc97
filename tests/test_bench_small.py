"""Smoke test of the benchmark harness: ``scripts/bench.py --small`` runs end to end and
produces a report whose numbers are sane. No timing thresholds here, ever: machines are
noisy; the benchmark reports ratios, it does not gate CI on them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_small_runs_and_reports(tmp_path):
    out = tmp_path / "bench.md"
    raw = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--small",
                        "--out", str(out), "--work", str(tmp_path / "work"),
                        "--json", str(raw)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # the report, its plot, and the generated data cleaned up
    text = out.read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert not (tmp_path / "work").exists()
    assert "python3 scripts/bench.py --small" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert any("ingest / floor" in line for line in table)
    assert any(line.startswith("| upper bound on input Mpix/s") for line in table)
    assert any("**mandatory sum**" in line for line in table)
    assert not any(re.search(r"\bnan\b|\binf\b", line, re.I) for line in table), table

    # the numbers behind it
    res = json.loads(raw.read_text())
    assert res["results"], res
    for r in res["results"]:
        ing = r["ingest"]
        assert len(ing["per_warp"]) == r["n"]
        assert all(_finite_positive(p["total_s"]) for p in ing["per_warp"])
        assert ing["commits"] >= 1 and sum(ing["commit_sizes"]) == r["n"]
        assert _finite_positive(ing["e2e_s"]) and _finite_positive(ing["maxrss_mb"])
        assert ing["state_bytes"] > 0 and max(ing["cells_per_warp"]) > 0
        assert _finite_positive(r["floor"]["e2e_s"])
        assert r["floor"]["check"]["cells"] > 0
        assert math.isfinite(r["floor"]["check"]["image_over_sigma"])
        for k in ("ingest_over_floor", "ours_mpix_s", "floor_mpix_s"):
            assert _finite_positive(r["ratios"][k]), k
        assert math.isfinite(ing["quarter_ratio"])
        # the bound from the spec-mandated work per warp (scripts/bench_bound.py)
        b = r["bound"]
        assert len(b["per_warp"]) == r["n"] and b["cores"] >= 1
        for k in ("read", "hash", "parse", "good_variances", "clip", "weight", "prepare",
                  "shard", "accumulate"):
            assert _finite_positive(b["median_s"][k]), k
        assert math.isclose(b["mandatory_s"], sum(b["median_s"][k] for k in
                                                  ("read", "hash", "parse", "weight")))
        assert _finite_positive(b["mandatory_s"]) and _finite_positive(b["mpix_per_warp"])
        assert abs(b["mpix_per_warp"] * r["n"] - r["input_mpix"]) < 1e-6 * r["input_mpix"]
        assert all(p["cells"] > 0 for p in b["per_warp"])
        assert _finite_positive(r["ratios"]["bound_mpix_s"])
        # the end-to-end lower bound: its parts add up, the state is the cells' two sums
        outer_area = r["cell_mpix"] * 1e6 / sum(ing["cells_per_warp"])  # px per cell
        assert math.isclose(b["min_state_bytes"],
                            max(ing["cells_per_warp"]) * 2 * 8 * outer_area)
        assert math.isclose(b["lower_bound_wall_s"], b["core_import_s"] + b["durable_write_s"]
                            + r["n"] * (b["mandatory_s"] + b["median_s"]["accumulate"])
                            / b["cores"])
        assert b["lower_bound_wall_s"] > b["durable_write_s"] > 0
        fin = r["finalize"]
        assert _finite_positive(fin["cell"]["cold_total_s"]) and fin["cell"]["n_inputs"] > 0
        assert _finite_positive(fin["patch"]["patch_s"]) and fin["patch"]["rc"] == 0
        peers = r["peers"]
        if "madd" in peers:  # when Montage is installed
            assert _finite_positive(r["ratios"]["ours_over_madd_mpix"])
            assert _finite_positive(r["ratios"]["bound_over_madd_mpix"])
            assert _finite_positive(r["ratios"]["e2e_bound_over_madd_mpix"])
            assert math.isfinite(peers["compare"]["madd"]["max_rel_diff"])
