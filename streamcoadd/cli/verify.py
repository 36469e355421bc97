"""``streamcoadd verify``: check a state's integrity and say how to fix what is wrong."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from streamcoadd.analysis.verify import repair, verify_state, writer_pid
from streamcoadd.cli.options import add_priority_option


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the state is consistent, 1 with findings (listed with what to do)."""
    root = Path(args.state)
    if args.repair:
        removed = repair(root)
        print(f"repair: removed {len(removed)} debris file(s)")
    problems = verify_state(root)
    if args.json:
        print(json.dumps([asdict(p) for p in problems], indent=2))
        return 1 if problems else 0
    pid = writer_pid(root)
    if pid:
        print(f"note: a writer (pid {pid}) is running; its in-progress files are not reported")
    if not problems:
        print(f"{root}: OK (state.json, ledger, every manifest and every cell file checked)")
        return 0
    errors = sum(p.severity == "error" for p in problems)
    print(f"{root}: {errors} error(s), {len(problems) - errors} benign finding(s)")
    for p in problems:
        print(f"- {p}")
        print(f"  what to do: {p.action}")
    if errors == 0:
        print("only benign findings: the state is consistent; the next writer tidies it up")
    return 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``verify`` to the ``streamcoadd`` sub-command parsers."""
    p = subparsers.add_parser("verify", help="check a state's integrity (every manifest, cell "
                                             "file checksum, ledger) and say how to fix it")
    p.add_argument("state")
    p.add_argument("--json", action="store_true", help="problems as JSON")
    p.add_argument("--repair", action="store_true",
                   help="first remove debris of interrupted commits (as a writer does on "
                        "opening; needs the writer lock)")
    add_priority_option(p)
    p.set_defaults(func=cmd_verify)
    return p
