"""The Dask cluster: connect to a scheduler (or start a LocalCluster), check that it can
run streamcoadd tasks, close it.

Dask and distributed are optional (``pip install 'streamcoadd[dask]'``): they are imported
inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref

from streamcoadd.core.errors import UserError
from streamcoadd.core.version import __version__

# client -> the LocalCluster that connect() started for it (closed with it by close())
_local_clusters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line
    reports of errors that come back from the cluster."""
    return (str(e).strip().splitlines() or [""])[0][:300]


def _environment() -> dict:
    """Run as a task: what the cluster side runs (checked before any real work)."""
    return {"streamcoadd": __version__, "python": sys.version.split()[0],
            "host": os.uname().nodename}


def check_cluster(client, timeout: float = 120.0) -> dict:
    """Fail early, with a clear message, if the cluster cannot run streamcoadd tasks: the
    scheduler unpickles every task and the workers run them, so both need the same
    streamcoadd importable as this process (docs/scale-out.md)."""
    try:
        env = client.submit(_environment, pure=False).result(timeout=timeout)
    except TimeoutError:
        raise UserError(f"no Dask worker ran a test task within {timeout:.0f} s; are workers "
                        "connected to the scheduler?") from None
    except Exception as e:  # noqa: BLE001
        raise UserError("the Dask cluster cannot run streamcoadd tasks "
                        f"({type(e).__name__}: {first_line(e)}); install the same streamcoadd "
                        "on the scheduler and the workers as here") from None
    if env["streamcoadd"] != __version__:
        raise UserError(f"Dask workers run streamcoadd {env['streamcoadd']} (on "
                        f"{env['host']}), this process {__version__}: use one version")
    return env


def connect(address: str, *, quiet: bool = True):
    """A ``distributed.Client`` for ``address``; ``local:N`` starts a LocalCluster of N
    single-threaded worker processes (closed with the client by :func:`close`)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("--dask needs Dask distributed: pip install 'streamcoadd[dask]' "
                        "(or pip install 'dask[distributed]')") from None
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
            if n < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--dask {address!r}: expected local:N with N >= 1 workers") from None
        import dask

        # A worker killed (OOM, kill -9) is restarted by its nanny; do not let the cluster
        # close that nanny if the restart is slower than this (default 15 s, under load).
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None,
                               silence_logs=logging.ERROR if quiet else logging.WARNING)
        client = Client(cluster)
        _local_clusters[client] = cluster
        return client
    try:
        return Client(address, timeout="30s")
    except OSError as e:
        raise UserError(f"--dask {address}: cannot reach the Dask scheduler ({e})") from None


def close(client) -> None:
    """Close a client from :func:`connect`, and the LocalCluster it started, if any."""
    cluster = _local_clusters.pop(client, None)
    client.close()
    if cluster is not None:
        cluster.close()
