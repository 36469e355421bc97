"""Exceptions that carry a message meant for the user (printed without a traceback)."""


class UserError(Exception):
    """A mistake the user can fix: bad arguments, missing files, wrong configuration."""


class WarpRejected(UserError):
    """A warp file that cannot be folded; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NoWorkFound(UserError):
    """Nothing to do, like LSST's ``NoWorkFound``: no warps, or no populated cell."""


class StateError(UserError):
    """The state directory is missing, of another version, or damaged."""
