"""TODO: core."""
