"""The daemon's settings: the ``[daemon]`` table of the settings file as a frozen
:class:`DaemonConfig`, and :func:`load_settings`, the one loader that reads the file (through
:func:`streamcoadd.core.config.site_config`) and applies the command line's overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from streamcoadd.core.config import RunConfig, site_config
from streamcoadd.core.errors import UserError
from streamcoadd.service.inbox import DEFAULT_PATTERNS


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table (``config/streamcoadd.toml``; every key documented there).

    Times are in seconds. Empty strings mean "the default place" (see each field).
    Built by :func:`load_settings`; change with ``dataclasses.replace``.
    """

    inbox: str = ""
    done: str = ""  # default: a sibling of the inbox named "done"
    rejected: str = ""  # default: a sibling of the inbox named "rejected"
    delete_done: bool = False
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    stable_seconds: float = 5.0
    poll: float = 0.0  # > 0: PollingObserver with this period (network filesystems)
    reconcile_interval: float = 60.0
    max_tracked: int = 10000
    status_file: str = ""  # default: STATE/daemon-status.json
    metrics_file: str = ""  # Prometheus text file; "" = none
    status_interval: float = 5.0
    log_file: str = ""
    log_format: str = "text"  # or "json"
    log_level: str = "INFO"
    on_stop: str = "commit"  # or "abandon"
    until_idle: float = 0.0  # > 0: exit 0 after this many idle seconds
    idle_commit: float = 1.0  # commit a pending batch after this long with nothing to take
    on_write_error: str = "pause"  # or "exit" (status 75, let systemd restart)
    write_retry_initial: float = 5.0  # s before the first probe after a write error
    write_retry_max: float = 60.0  # s, cap of the doubling back-off between probes
    throughput_window: float = 60.0  # s: warps/s and Mpix/s over this many last seconds ...
    throughput_warps: int = 32  # ... and over this many last folded warps

    @classmethod
    def from_dict(cls, d: dict) -> DaemonConfig:
        """From the ``[daemon]`` table; unknown keys are a ``UserError``."""
        names = {f.name for f in fields(cls)}
        extra = set(d) - names
        if extra:
            raise UserError(f"unknown [daemon] setting(s): {', '.join(sorted(extra))}; "
                            f"known: {', '.join(sorted(names))}")
        d = dict(d)
        if "patterns" in d:
            d["patterns"] = tuple(d["patterns"])
        return cls(**d)

    def validate(self) -> None:
        """Raise ``UserError`` (one line naming the setting) for a value that cannot work."""
        if not self.inbox:
            raise UserError("no inbox: give --inbox DIR (or inbox = ... in [daemon])")
        if (self.stable_seconds < 0 or self.poll < 0 or self.reconcile_interval <= 0
                or self.idle_commit < 0 or self.until_idle < 0 or self.max_tracked < 1):
            raise UserError("[daemon] stable_seconds, poll, idle_commit and until_idle must be "
                            ">= 0, reconcile_interval > 0 and max_tracked >= 1")
        if self.on_write_error not in ("pause", "exit"):
            raise UserError(f"[daemon] on_write_error must be 'pause' or 'exit', not "
                            f"{self.on_write_error!r}")
        if not 0 < self.write_retry_initial <= self.write_retry_max:
            raise UserError("[daemon] write_retry_initial must be > 0 and <= write_retry_max")
        if self.on_stop not in ("commit", "abandon"):
            raise UserError(f"[daemon] on_stop must be 'commit' or 'abandon', not {self.on_stop!r}")
        if self.log_format not in ("text", "json"):
            raise UserError(f"[daemon] log_format must be 'text' or 'json', not {self.log_format!r}")
        if not self.patterns:
            raise UserError("[daemon] patterns must not be empty")
        if self.throughput_window <= 0 or self.throughput_warps < 2:
            raise UserError("[daemon] throughput_window must be > 0 and throughput_warps >= 2")


@dataclass(frozen=True)
class Settings:
    """Everything ``streamcoadd watch`` runs with."""

    daemon: DaemonConfig
    run: RunConfig


def load_settings(path: str | None, daemon: dict | None = None,
                  run: dict | None = None) -> Settings:
    """The daemon's settings: the ``[daemon]`` and ``[run]`` tables of ``path`` (else
    ``config/streamcoadd.toml`` of this checkout, else built-in defaults: the rule of every
    subcommand), with ``daemon`` and ``run`` (setting name -> value, e.g. from the command
    line) replacing theirs. Validated: raises ``UserError``."""
    d = site_config(path)
    cfg = replace(DaemonConfig.from_dict(d.get("daemon", {})), **(daemon or {}))
    cfg.validate()
    rc = replace(RunConfig.from_dict(dict(d.get("run", {}))), **(run or {}))
    return Settings(cfg, rc)
