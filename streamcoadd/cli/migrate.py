"""``streamcoadd migrate``: convert a state of format 1 to format 2, crash-safely."""

from __future__ import annotations

import argparse

from streamcoadd.store.migrate import MigrationStatus, migrate_state


def cmd_migrate(args: argparse.Namespace) -> int:
    """Exit 0 when the state is (now) format 2. A kill at any instant leaves a state of
    either format that 'streamcoadd verify' accepts; run the command again to finish."""
    progress = None if args.quiet else (lambda line: print(f"  {line}"))
    r = migrate_state(args.state, progress=progress)
    if r.status is MigrationStatus.ALREADY:
        print(f"{args.state}: already state format 2 (nothing to do)")
    else:
        print(f"{args.state}: migrated to state format 2: {r.shards} shard(s), {r.cells} "
              f"cell(s), {r.counted_cells} with exact integer counts (the others keep "
              "format 1's float coverage tests; docs/state-format.md, 'Migration')")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``migrate`` to the ``streamcoadd`` sub-command parsers."""
    p = subparsers.add_parser("migrate", help="convert a state of format 1 to format 2 "
                                              "(crash-safe; stop writers first)")
    p.add_argument("state")
    p.add_argument("--quiet", action="store_true", help="no line per shard")
    p.set_defaults(func=cmd_migrate)
    return p
