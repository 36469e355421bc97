"""The pure core: skymap geometry, mask planes, PSF stamps, warp value types, the fold and
coadd math, fold settings. No file, process or network I/O; the clock is passed in.

May import: numpy, scipy, astropy (WCS, stats, tables) and nothing else of streamcoadd.
"""
