"""The streamcoadd command line: one settings loader, one module per command; it parses,
calls a lower layer, and maps errors to exit codes. No science here.

May import: every other layer; nothing imports it.
"""
