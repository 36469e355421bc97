"""Every ```python block of docs/analysis.md runs, in order, as one session, against a small
state built here with the real CLI (``STATE`` environment variable, as the page says).

Blocks that import h5py (the plain-h5py example) are also run on their own in a fresh
interpreter in which ``import streamcoadd`` fails, to prove they need only h5py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_reader_api import ROOT, build_state

DOC = ROOT / "docs" / "analysis.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[int, str]]:
    text = DOC.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return build_state(tmp_path_factory.mktemp("docs"))


def test_doc_has_the_promised_examples():
    blocks = [b for _, b in python_blocks()]
    joined = "\n".join(blocks)
    assert len(blocks) >= 8
    for needle in ("open_state", "to_ccddata", "contributors", "depth_map", "stitched()",
                   "weight_map", "accumulators", "make_figure"):
        assert needle in joined, needle
    standalone = [b for b in blocks if "import h5py" in b]
    assert len(standalone) == 1 and "import streamcoadd" not in standalone[0]
    assert "from streamcoadd" not in standalone[0]
    for png in re.findall(r"\((analysis_[a-z_]+\.png)\)", DOC.read_text()):
        assert (DOC.parent / png).exists(), png


def test_every_python_block_runs(state, tmp_path, monkeypatch):
    monkeypatch.setenv("STATE", str(state))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__analysis_doc__"}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"{DOC}:{line}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"docs/analysis.md block at line {line} failed: {e!r}") from e
    # the examples really wrote what they say
    assert (tmp_path / "cell_3_4.fits").exists()
    assert (tmp_path / "patch_0_0.fits").exists()
    assert (tmp_path / "psf_0_0.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_h5py_block_needs_no_streamcoadd(state, tmp_path):
    fake = tmp_path / "fake"
    (fake / "streamcoadd").mkdir(parents=True)
    (fake / "streamcoadd" / "__init__.py").write_text(
        "raise ImportError('streamcoadd must not be needed by this example')\n")
    env = dict(os.environ, STATE=str(state), PYTHONPATH=str(fake))
    standalone = [(line, b) for line, b in python_blocks() if "import h5py" in b]
    assert standalone
    for line, code in standalone:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, f"block at line {line}:\n{r.stdout}\n{r.stderr}"
        assert "inputs per cell" in r.stdout
