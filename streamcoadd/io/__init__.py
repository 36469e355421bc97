"""Files in and out: reading and validating warp FITS files, writing warps (simulation,
tests) and coadd outputs (FITS layouts, Rubin CellCoadd files, a data butler).

May import: streamcoadd.core (and astropy.io, GalSim, lsst-images, lsst-daf-butler lazily).
"""
