"""One pipeline, load -> admit -> fold -> commit: the source of prepared, routed warps,
admission, the fold into shards, run by two executors (local with prefetch, Dask); retract.

May import: streamcoadd.core, streamcoadd.io, streamcoadd.store (Dask lazily).
"""
