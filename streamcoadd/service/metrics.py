"""Prometheus text-file export of the daemon's status (for node_exporter's textfile
collector): point ``--metrics-file`` at ``/var/lib/node_exporter/textfile/streamcoadd.prom``.
Every metric is documented in ``docs/operations.md`` ("Metrics")."""

from __future__ import annotations


def prometheus_text(status: dict) -> str:
    """Render the daemon status dict (see ``Daemon.status``) as Prometheus text format.

    Parameters
    ----------
    status : dict
        The status file's content.

    Returns
    -------
    str
        ``# HELP`` / ``# TYPE`` lines and one sample per line, labelled ``state_dir``.
    """
    labels = f'state_dir="{status.get("state_dir", "")}"'
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP streamcoadd_{name} {help_}")
        lines.append(f"# TYPE streamcoadd_{name} {kind}")
        for extra, value in samples:
            lab = labels + (f",{extra}" if extra else "")
            lines.append(f"streamcoadd_{name}{{{lab}}} {float(value):.6g}")

    counts = status.get("counts", {})
    metric("warps_total", "counter", "Warps by final outcome since the daemon started.",
           [(f'outcome="{k}"', counts.get(k, 0))
            for k in ("folded", "no_cells", "duplicate", "rejected")])
    metric("commits_total", "counter", "Durable commits.", [("", counts.get("commits", 0))])
    metric("errors_total", "counter", "Commit or internal errors.", [("", counts.get("errors", 0))])
    queue = status.get("queue", {}) or {}
    metric("queue_length", "gauge", "Complete files waiting in the inbox.",
           [("", queue.get("ready", 0))])
    metric("pending_warps", "gauge", "Warps folded in memory, not yet durable.",
           [("", status.get("pending", 0))])
    fold = status.get("latency", {}) or {}
    metric("fold_seconds_sum", "counter", "Total time spent reading and folding warps.",
           [("", fold.get("fold_s_sum", 0.0))])
    metric("fold_seconds_count", "counter", "Warps whose fold time is in fold_seconds_sum.",
           [("", fold.get("fold_count", 0))])
    metric("commit_seconds_sum", "counter", "Total time spent in durable commits.",
           [("", fold.get("commit_s_sum", 0.0))])
    metric("bytes_written_total", "counter", "Bytes of cell files and manifests written.",
           [("", status.get("bytes_written", 0))])
    metric("write_errors_total", "counter",
           "Write errors (disk full, quota, I/O) that paused folding.",
           [("", counts.get("write_errors", 0))])
    paused = status.get("paused") or {}
    metric("paused", "gauge",
           "1 while folding is paused by a write error (disk full...); it resumes by itself.",
           [('reason="write_error"', 1 if paused else 0)])
    metric("paused_seconds", "gauge", "Seconds the current pause has lasted (0 if none).",
           [("", paused.get("paused_s", 0))])
    _throughput(metric, status.get("throughput", {}) or {})
    metric("up", "gauge", "1 while the daemon runs.",
           [("", 1 if status.get("state") not in ("stopped", "failed") else 0)])
    metric("uptime_seconds", "gauge", "Seconds since the daemon started.",
           [("", status.get("uptime_s", 0))])
    return "\n".join(lines) + "\n"


def _throughput(metric, t: dict) -> None:
    """Steady-state throughput over the sliding windows (``window="60s"`` / ``"32warps"``)."""
    tw, ww = t.get("time_window"), t.get("warp_window")
    if not (tw and ww):
        return
    labels = (f'window="{tw["seconds"]:g}s"', f'window="{ww["size"]}warps"')
    metric("throughput_warps_per_second", "gauge",
           "Folded warps made durable per second over the sliding window.",
           [(lab, w["warps_per_s"]) for lab, w in zip(labels, (tw, ww))])
    metric("throughput_input_mpix_per_second", "gauge",
           "Input pixels (warp IMAGE planes) folded and made durable, Mpix per second, "
           "over the sliding window.",
           [(lab, w["input_mpix_per_s"]) for lab, w in zip(labels, (tw, ww))])
    metric("input_mpix_total", "counter",
           "Input pixels of the folded warps made durable since the daemon started, Mpix.",
           [("", t.get("input_mpix_total", 0.0))])
