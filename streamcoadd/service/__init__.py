"""TODO: service."""
