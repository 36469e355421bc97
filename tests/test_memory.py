"""streamcoadd.pipeline.memory: freed warp-sized arrays are reused, not faulted in again.

On virtual machines a fresh page costs microseconds (the benchmark machine: ~1.3-2.6 s per
GB), so a fold that frees and re-allocates a few hundred MB per warp must get the same
pages back. Checked with the kernel's own page-fault counter in fresh processes, against a
control process without the tuning (which must fault, or the check proves nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREAMBLE = """
import resource, sys
import numpy as np
try:  # 4 KiB pages, so that the count does not depend on transparent huge pages
    from numpy._core.multiarray import _set_madvise_hugepage
    _set_madvise_hugepage(False)
except ImportError:
    pass
sys.path.insert(0, {root!r})
from streamcoadd.pipeline.memory import retain_freed_memory
"""

CODE = """
if {retain}:
    assert retain_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(25_000_000)  # 200 MB: a patch warp's float64 plane is 92 MB
del a
t = np.ones(1000)  # a small allocation in between, as in real code
m0 = faults()
b = np.ones(25_000_000)
print(faults() - m0)
"""

THREAD_CODE = """
import threading
from concurrent.futures import ThreadPoolExecutor
if {early}:
    assert retain_freed_memory()
# a thread that allocates before the tuning (e.g. a progress or sampler thread)
t = threading.Thread(target=lambda: [bytearray(100_000) for _ in range(10)])
t.start(); t.join()
retain_freed_memory()
def load():  # as the warp loader thread: a warp-sized plane, freed, then another
    a = np.ones(25_000_000)
    del a
    m0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    b = np.ones(25_000_000)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - m0
with ThreadPoolExecutor(1) as pool:
    print(pool.submit(load).result())
"""


def _faults(code: str, **fields) -> int:
    """Page faults that ``code`` (after PREAMBLE) prints, run in a fresh process."""
    src = PREAMBLE.format(root=str(ROOT)) + code.format(**fields)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def test_freed_memory_is_reused_without_page_faults():
    control = _faults(CODE, retain=False)
    assert control > 20_000, f"control run faulted only {control} pages: check is void"
    # with the tuning (a regression seen: a trim threshold of 0 re-faulted everything)
    assert _faults(CODE, retain=True) < 1_000


def test_worker_threads_reuse_memory_when_tuned_before_any_thread():
    # Control: tuned only after another thread allocated; the worker's 200 MB plane is
    # mmap'ed afresh (this is why cli.main tunes first thing).
    control = _faults(THREAD_CODE, early=False)
    assert control > 20_000, f"control run faulted only {control} pages: check is void"
    assert _faults(THREAD_CODE, early=True) < 1_000
