"""``streamcoadd watch``: run the daemon (``streamcoadd.service.daemon``) on an inbox, folding
in this process or, with ``--dask ADDRESS``, on a Dask cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamcoadd.cli.options import add_dask_options
from streamcoadd.core.errors import UserError
from streamcoadd.pipeline import dask_cluster, dask_executor
from streamcoadd.pipeline.dask_worker import drop_worker_caches
from streamcoadd.pipeline.ingest import LocalIngestor
from streamcoadd.service.daemon import EXIT_ERROR, EXIT_LOCKED, Daemon, IngestorFactory
from streamcoadd.service.logs import log as daemon_log
from streamcoadd.service.logs import setup_logging
from streamcoadd.service.settings import Settings, load_settings
from streamcoadd.service.systemd import SdNotify
from streamcoadd.store.state import StateLocked

# options of `watch` that override a [daemon] setting of the same name
DAEMON_OPTIONS = ("inbox", "done", "rejected", "poll", "stable_seconds", "reconcile_interval",
                  "until_idle", "idle_commit", "status_file", "metrics_file", "log_file",
                  "on_stop", "delete_done", "on_write_error", "write_retry_initial",
                  "write_retry_max")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``watch`` subcommand to the ``streamcoadd`` CLI."""
    p = subparsers.add_parser(
        "watch", help="run the daemon: fold warps as they arrive in an inbox",
        description="Watch INBOX and fold every complete warp file into STATE. Producers "
                    "should write NAME.fits.tmp (or into INBOX/tmp/) and rename; other files "
                    "are taken once their size and mtime are stable. Folded warps move to "
                    "--done, rejected ones to --rejected with NAME.reason. Stop with SIGTERM "
                    "or Ctrl-C (pending warps are committed first). See docs/operations.md.")
    p.add_argument("state", metavar="STATE", help="state directory (created by 'streamcoadd init')")
    p.add_argument("--inbox", metavar="DIR", help="directory to watch (created if missing)")
    p.add_argument("--done", metavar="DIR",
                   help="where folded and duplicate warps go (default: INBOX/../done)")
    p.add_argument("--rejected", metavar="DIR",
                   help="where rejected warps go, with NAME.reason (default: INBOX/../rejected)")
    p.add_argument("--delete-done", action="store_true", default=None,
                   help="delete folded warps instead of moving them to --done")
    p.add_argument("--poll", type=float, metavar="SECONDS",
                   help="poll the inbox every SECONDS instead of inotify (network filesystems)")
    p.add_argument("--stable-seconds", type=float, metavar="S",
                   help="a file not renamed into the inbox is taken once its size and mtime "
                        "did not change for S seconds (default 5)")
    p.add_argument("--reconcile", type=float, metavar="SECONDS", dest="reconcile_interval",
                   help="full rescan of the inbox every SECONDS (default 60)")
    p.add_argument("--until-idle", type=float, metavar="SECONDS",
                   help="exit 0 after SECONDS with nothing to do and nothing pending")
    p.add_argument("--commit-every", type=int, metavar="N",
                   help="make folded warps durable every N warps (default from [run])")
    p.add_argument("--commit-interval", type=float, metavar="S",
                   help="... or at least every S seconds (default from [run])")
    p.add_argument("--idle-commit", type=float, metavar="S",
                   help="commit pending warps once nothing new was taken for S seconds "
                        "(default 1; --commit-every/--commit-interval still apply)")
    p.add_argument("--status-file", metavar="F", help="default STATE/daemon-status.json")
    p.add_argument("--metrics-file", metavar="F",
                   help="also write Prometheus text-format metrics to F (textfile collector)")
    p.add_argument("--log-file", metavar="F", help="also log to F (logrotate-safe)")
    p.add_argument("--log-json", action="store_true", default=None,
                   help="log one JSON object per line")
    p.add_argument("--on-stop", choices=("commit", "abandon"),
                   help="at SIGTERM/SIGINT commit pending warps (default) or leave them in "
                        "the inbox")
    p.add_argument("--write-retry-initial", type=float, metavar="S",
                   help="after a write error (disk full...) folding pauses; first check "
                        "whether writing works again after S seconds (default 5)")
    p.add_argument("--write-retry-max", type=float, metavar="S",
                   help="... doubling the wait up to S seconds between checks (default 60)")
    p.add_argument("--exit-on-write-error", action="store_const", const="exit",
                   dest="on_write_error",
                   help="exit with status 75 on a write error instead of pausing and "
                        "resuming by itself (for a supervisor that restarts it)")
    p.add_argument("--config", metavar="TOML",
                   help="settings file with [daemon] and [run] tables "
                        "(default: config/streamcoadd.toml, else built-in defaults)")
    add_dask_options(p)
    p.set_defaults(func=cmd_watch)
    return p


def cmd_watch(args: argparse.Namespace) -> int:
    """The daemon's exit status (docs/operations.md)."""
    if args.dask:
        return _watch_dask(args)
    return run_daemon(args)


def _watch_dask(args: argparse.Namespace) -> int:
    """The daemon, folding on a Dask cluster. The daemon process is the coordinator
    (state lock, ledger, inbox); a batch of warps leaves the inbox only when every shard
    task of every warp in it has returned."""
    if args.dask_batch is not None and args.dask_batch < 1:
        print("streamcoadd watch: --dask-batch must be >= 1", file=sys.stderr)
        return EXIT_ERROR
    try:
        client = dask_cluster.connect(args.dask)
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        dask_cluster.check_cluster(client)
    except UserError as e:
        dask_cluster.close(client)
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR
    notify = SdNotify()

    def make_ingestor(store, run):
        return dask_executor.DistributedIngestor(
            store, run, client, batch=args.dask_batch, retries=args.dask_retries,
            log_failures=True, logger=daemon_log, heartbeat=notify.ping)

    try:
        return run_daemon(args, make_ingestor)
    finally:
        try:
            client.run(drop_worker_caches, str(Path(args.state).absolute()))
        except Exception:  # noqa: BLE001 - a worker just lost; its memory is gone anyway
            pass
        dask_cluster.close(client)


def settings(args: argparse.Namespace) -> Settings:
    """The settings file's [daemon] and [run] tables with the command line's options."""
    daemon = {k: getattr(args, k) for k in DAEMON_OPTIONS if getattr(args, k, None) is not None}
    if args.log_json:
        daemon["log_format"] = "json"
    run = {}
    if args.commit_every is not None:
        if args.commit_every < 1:
            raise UserError("--commit-every must be >= 1")
        run["commit_every"] = args.commit_every
    if args.commit_interval is not None:
        if args.commit_interval < 0:
            raise UserError("--commit-interval must be >= 0")
        run["commit_interval"] = args.commit_interval
    return load_settings(args.config, daemon, run)


def run_daemon(args: argparse.Namespace, make_ingestor: IngestorFactory = LocalIngestor) -> int:
    """Run the daemon until it stops; its exit status. Mistakes: one line, no traceback."""
    try:
        s = settings(args)
        setup_logging(s.daemon.log_format, s.daemon.log_file, s.daemon.log_level)
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR
    d = Daemon(Path(args.state), s, make_ingestor)
    try:
        return d.run()
    except StateLocked as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR
