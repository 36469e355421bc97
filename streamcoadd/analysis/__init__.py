"""Reading a state for science: the reader API (cells, patches, tracts), finalize to FITS
and Rubin formats, depth/weight/PSF maps and plots, verify, the PSF science check.

May import: streamcoadd.core, io, store, pipeline (matplotlib and lsst lazily).
"""
