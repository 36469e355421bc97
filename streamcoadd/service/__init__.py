"""The long-running service: the daemon loop, the inbox (watchdog events are hints),
quarantine, the write-error pause, status file and metrics, systemd notify, I/O priority.

May import: every layer below it (core, io, store, pipeline, analysis), never the CLI.
"""
