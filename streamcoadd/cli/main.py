"""The ``streamcoadd`` command line. No science here: it parses, calls, and reports.

This module only builds the parser from the command modules (one per subcommand:
``cli/init.py``, ``cli/ingest.py``, ...) and maps errors to exit codes.

User mistakes (``UserError``) print one line and exit 2; nothing prints a traceback
unless ``STREAMCOADD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from streamcoadd.analysis.reader import lower_priority_for, set_default_priority
from streamcoadd.cli import (
    finalize,
    ingest,
    init,
    migrate,
    plot,
    retract,
    simulate,
    status,
    verify,
    watch,
)
from streamcoadd.core.errors import NoWorkFound, UserError, write_error_message
from streamcoadd.core.version import __version__
from streamcoadd.pipeline.memory import retain_freed_memory

# exit codes of every subcommand (``watch`` adds its own: docs/operations.md)
EXIT_OK = 0
EXIT_USAGE = 2  # a user mistake: one line on stderr
EXIT_NOTHING = 3  # nothing matched (NoWorkFound)
EXIT_INTERRUPTED = 130
EXIT_BUG = 70

# The subcommands, in the order of ``streamcoadd --help``. Each module has
# ``register(subparsers)``, which adds its parser and sets ``func``.
COMMANDS = (init, ingest, retract, finalize, status, simulate, watch, verify, plot, migrate)


def build_parser() -> argparse.ArgumentParser:
    """The ``streamcoadd`` parser with every subcommand."""
    p = argparse.ArgumentParser(prog="streamcoadd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"streamcoadd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (see the constants above)."""
    # Before any thread exists: a thread that allocates first gets its own malloc arena,
    # and later threads (the warp loader) may share it, outside the tuning.
    retain_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        # read-only commands (--priority) yield to a running writer for the whole command;
        # verify --repair is a writer itself
        if getattr(args, "priority", None) and not getattr(args, "repair", False):
            set_default_priority(args.priority)
            lower_priority_for(args.state, args.priority)
        return int(args.func(args) or EXIT_OK)
    except NoWorkFound as e:
        print(f"streamcoadd: nothing to do: {e}", file=sys.stderr)
        return EXIT_NOTHING
    except UserError as e:
        print(f"streamcoadd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("streamcoadd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("STREAMCOADD_DEBUG"):
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # disk full anywhere else (the lock file, ...): a message, not a traceback
            print(f"streamcoadd: error: {write_error_message(e.filename or 'the state', e)}",
                  file=sys.stderr)
            return EXIT_USAGE
        print("streamcoadd: internal error (a bug; please report it with this trace):",
              file=sys.stderr)
        traceback.print_exc()
        return EXIT_BUG
