"""Optional dependencies: check that they import, or say in one line what to install."""

from __future__ import annotations

import importlib
import sys

from streamcoadd.core.errors import UserError


def require(modules: tuple[str, ...], hint: str, min_python: tuple[int, int] = (3, 12)) -> None:
    """Import ``modules`` (the optional extra's packages) or raise :class:`UserError`:
    ``hint`` (what to install), and why (the Python version, or the import error)."""
    if sys.version_info[:2] < min_python:
        raise UserError(f"{hint} (this is Python {sys.version_info.major}."
                        f"{sys.version_info.minor})")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"{hint} ({e})") from None
