"""Argument types, option groups and small helpers shared by the subcommands.

Nothing here runs a command: the command modules (``cli/ingest.py``, ``cli/watch.py``, ...)
import these; ``cli/main.py`` only builds the parser from them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from streamcoadd.core.config import RunConfig, site_config
from streamcoadd.core.errors import NoWorkFound, UserError

# [run] settings a command line may override (the option's dest is the setting's name)
RUN_OPTIONS = ("commit_every", "commit_interval", "cache_gb", "prefetch", "commit_processes")


def parse_pair(text: str) -> tuple[int, int]:
    """``"X,Y"`` -> ``(X, Y)`` (an argparse ``type=``)."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two integers), got {text!r}") from None
    return x, y


def run_config(args: argparse.Namespace) -> RunConfig:
    """The ``[run]`` table of ``--config`` (or the checkout's settings file), with the
    command line's ``--commit-every`` & co. (those given) replacing its values."""
    rc = RunConfig.from_dict(dict(site_config(getattr(args, "config", None)).get("run", {})))
    over = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k, None) is not None}
    return replace(rc, **over)


def warp_files(paths: list[str]) -> list[Path]:
    """The warp files named on the command line: files as given, directories expanded to
    their ``*.fits`` files (sorted). Raises ``UserError`` for a missing path and
    ``NoWorkFound`` when nothing is left."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.name.endswith(".fits") and f.is_file())
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    if not out:
        raise NoWorkFound(f"no *.fits files found in {' '.join(paths)}")
    return out


class _PlainProgress:
    """What ``progress_bar`` returns without tqdm or with ``--quiet``: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, quiet: bool):
    """A tqdm progress bar on stderr (``total`` warps), or a silent stand-in."""
    if quiet:
        return _PlainProgress()
    try:
        from tqdm import tqdm  # optional: the CLI works without it
    except ImportError:
        return _PlainProgress()
    return tqdm(total=total, unit="warp", file=sys.stderr, dynamic_ncols=True)


def add_priority_option(parser: argparse.ArgumentParser) -> None:
    """``--priority`` of the read-only commands: yield to a running writer
    (docs/reliability.md, readers). ``cli/main.py`` applies it before the command runs."""
    parser.add_argument("--priority", choices=("auto", "low", "normal"), default="auto",
                        help="auto (default): run at the lowest CPU and I/O priority "
                             "while a writer (the daemon) holds the state, so reading "
                             "never slows it down; normal: do not; low: always lower")


def add_dask_options(parser: argparse.ArgumentParser) -> None:
    """``--dask ADDRESS`` and its tuning options (``ingest`` and ``watch``)."""
    g = parser.add_argument_group("scale-out (Dask distributed; docs/scale-out.md)")
    g.add_argument("--dask", metavar="ADDRESS",
                   help="fold on a Dask cluster: a scheduler address (tcp://host:8786) or "
                        "local:N for N local worker processes")
    g.add_argument("--dask-batch", type=int, metavar="N", dest="dask_batch",
                   help="warps per shard task when the shard is idle (default "
                        "--commit-every); a busy shard's next task takes up to 4N")
    g.add_argument("--dask-retries", type=int, default=3, metavar="N", dest="dask_retries",
                   help="retries of a failed shard task (default 3)")
