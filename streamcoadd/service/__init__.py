"""The long-running service: the daemon loop (daemon, batch), the inbox (watchdog events are
hints), quarantine, the write-error pause, settings, logs, stats/status file/metrics, systemd.
(Readers' I/O priority is the analysis layer's: ``analysis/reader.py``.)

May import: every layer below it (core, io, store, pipeline, analysis), never the CLI.
"""
