"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def parse_pair(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two integers), got {text!r}") from None
    return x, y
