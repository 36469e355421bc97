"""The package version, one place (the CLI, Dask environment checks, file metadata)."""

__version__ = "0.2.0"
