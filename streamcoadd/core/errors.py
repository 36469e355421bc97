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


class StateWriteError(StateError, OSError):
    """Writing the state failed (disk full, quota, I/O error). Nothing was half-written:
    every earlier commit is intact and the warps of the failed commit are still pending.
    Also an ``OSError`` (with the original ``errno``), so callers that treat I/O errors
    as temporary (the daemon) do so."""

    def __init__(self, message: str, errno_: int | None = None):
        OSError.__init__(self, errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_error_message(what: str, e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
    full = "no space" in str(e).lower() or "disk is full" in str(e).lower() \
        or getattr(e, "errno", None) in (28, 122)  # ENOSPC, EDQUOT
    hint = ("the disk is full: free space (or move the state to a larger disk) and run again"
            if full else "fix the cause and run again")
    return (f"cannot write {what}: {text}. The state is consistent (the last commit is "
            f"intact, nothing was half-written) and the warps of this commit are not lost: "
            f"{hint}; 'ingest' the same files again / the daemon keeps them in its inbox")
