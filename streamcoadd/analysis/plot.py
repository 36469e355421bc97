"""Pictures of a state: ``streamcoadd plot depth|weight|psf|quicklook STATE --out FILE.png``.

* ``depth``     inputs per cell (the group that makes each coadd), cell grid, patch labels;
* ``weight``    effective weight per cell (median Σw over the inner box, nJy⁻²), with the
                equivalent per-pixel noise 1/√Σw on the colour bar;
* ``psf``       coadd PSF FWHM per cell (arcsec) with ellipticity whiskers;
* ``quicklook`` the stitched coadd, asinh stretch, cell grid, empty cells hatched,
                colour bar in nJy.

With ``--patch X,Y`` one patch is drawn with all its cells (border cells included, the
patch inner boundary drawn thick); without it the whole tract is drawn from the patches'
inner cells (which tile the tract), patch boundaries labelled. Axes are RA/Dec (astropy
``WCSAxes``) over tract pixels.

matplotlib is an optional extra (``pip install 'streamcoadd[plot]'``). The functions
``depth_figure``, ``weight_figure``, ``psf_figure`` and ``quicklook_figure`` return a
matplotlib ``Figure`` for use from Python.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamcoadd.core.coadd import BIT
from streamcoadd.core.errors import NoWorkFound, UserError
from streamcoadd.core.skymap import Box, PatchId

KINDS = ("depth", "weight", "psf", "quicklook")
MAX_IMAGE_PX = 3000  # quick-looks larger than this are block-averaged down
MAX_GRID_LINES = 90  # denser cell grids are not drawn (patch boundaries still are)
EMPTY_COLOR = "#d9d9d9"
HATCH_COLOR = "#8c8c8c"


def require_matplotlib():
    """Import matplotlib (Agg, no pyplot state) or fail with one clear line."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional extra: "
                        "pip install 'streamcoadd[plot]'") from None
    matplotlib.use("Agg", force=False)
    return matplotlib


# --------------------------------------------------------------------------- selection

@dataclass
class View:
    """What one picture shows: a tract or one patch of it, in one band."""

    state: object
    band: str
    tract: object  # reader.TractView
    patch: object | None  # reader.PatchView or None (whole tract)
    patches: list = field(default_factory=list)  # PatchViews drawn

    @property
    def title(self) -> str:
        where = f"tract {self.tract.id}"
        if self.patch is not None:
            where += f", patch {self.patch.id.x},{self.patch.id.y}"
        return f"{self.state.skymap.name} · {where} · band {self.band}"


def select(st, band: str | None = None, tract: int | None = None,
           patch: tuple[int, int] | None = None) -> View:
    """Resolve ``--band/--tract/--patch`` against what the state holds."""
    bands = st.bands()
    if not bands:
        raise NoWorkFound(f"{st.root}: no cell is populated yet; ingest warps first")
    if band is None:
        if len(bands) > 1:
            raise UserError(f"the state has bands {', '.join(bands)}: choose one with --band")
        band = bands[0]
    elif band not in bands:
        raise NoWorkFound(f"band {band!r} has no populated cell (bands: {', '.join(bands)})")
    populated = st.patches(band)
    tracts = sorted({p.tract for p in populated})
    if tract is None:
        if len(tracts) > 1:
            raise UserError(f"band {band} has data in tracts {', '.join(map(str, tracts))}: "
                            "choose one with --tract")
        tract = tracts[0]
    tv = st.tract(tract)  # raises a UserError for an unknown tract
    if patch is not None:
        pv = st.patch(PatchId(tract, *patch), band)
        if not pv.generations:
            have = ", ".join(f"{p.x},{p.y}" for p in populated if p.tract == tract) or "none"
            raise NoWorkFound(f"tract {tract} patch {patch[0]},{patch[1]} has no populated "
                              f"cell in band {band} (populated patches: {have})")
        return View(st, band, tv, pv, [pv])
    pvs = tv.patches(band)
    if not pvs:
        raise NoWorkFound(f"tract {tract} has no populated cell in band {band}")
    return View(st, band, tv, None, pvs)


# --------------------------------------------------------------------------- cell maps

@dataclass
class CellMap:
    """Values on a regular grid of cells, in tract pixel coordinates."""

    values: np.ndarray  # (ny, nx), NaN = empty
    x0: float  # tract pixel of the left edge of column 0 (pixel-centre convention: -0.5)
    y0: float
    step: int
    cell_xy: list = field(default_factory=list)  # (col, row) -> (cell_x, cell_y) labels

    @property
    def xedges(self):
        return self.x0 + self.step * np.arange(self.values.shape[1] + 1)

    @property
    def yedges(self):
        return self.y0 + self.step * np.arange(self.values.shape[0] + 1)

    def centres(self):
        ny, nx = self.values.shape
        xs = self.x0 + self.step * (np.arange(nx) + 0.5)
        ys = self.y0 + self.step * (np.arange(ny) + 0.5)
        return np.meshgrid(xs, ys)


def summaries(view: View):
    """The per-cell summary table of the view: the patch's, or the whole tract's."""
    if view.patch is not None:
        return view.patch.summary()
    return view.tract.summary(view.band)


def cell_map(view: View, table, column: str) -> CellMap:
    geo = view.tract.geometry
    g = geo.cells
    if view.patch is not None:
        ox, oy = geo.cell_grid_origin(view.patch.id)
        vals = np.full(view.patch.shape, np.nan)
        for r in table:
            vals[int(r["cell_y"]), int(r["cell_x"])] = r[column]
        return CellMap(vals, ox - 0.5, oy - 0.5, g.inner)
    vals = view.tract.map_from_summary(table, column).astype(float)
    if column in ("n_inputs", "n_fallback"):
        populated = view.tract.map_from_summary(table, "weight")
        vals[~np.isfinite(populated)] = np.nan
    return CellMap(vals, -0.5, -0.5, g.inner)


def _new_figure(view: View, width: float = 8.6, height: float = 7.4):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection=view.tract.wcs)
    ra, dec = ax.coords[0], ax.coords[1]
    ra.set_axislabel("RA (ICRS)")
    dec.set_axislabel("Dec (ICRS)")
    ra.set_major_formatter("hh:mm:ss")
    dec.set_major_formatter("dd:mm:ss")
    ra.set_ticklabel(exclude_overlapping=True)
    ra.display_minor_ticks(True)
    dec.display_minor_ticks(True)
    return fig, ax


def _frame(view: View) -> Box:
    """Tract-pixel box the axes show."""
    geo = view.tract.geometry
    if view.patch is not None:
        return view.patch.outer_box.grown(-geo.cells.border)
    return geo.inner_box


def _decorate(ax, view: View, grid_color="white", grid_alpha=0.55, label_color="white",
              cm: CellMap | None = None):
    """Cell grid, patch outlines and labels, axis limits."""
    from matplotlib.patches import Rectangle

    geo = view.tract.geometry
    g = geo.cells
    frame = _frame(view)
    step = g.inner
    xs = np.arange(frame.x0, frame.x1 + 1, step) - 0.5
    ys = np.arange(frame.y0, frame.y1 + 1, step) - 0.5
    lw = 0.5 if max(len(xs), len(ys)) > 30 else 0.8
    if max(len(xs), len(ys)) <= MAX_GRID_LINES:  # beyond, only patch boundaries are drawn
        ax.vlines(xs, frame.y0 - 0.5, frame.y1 - 0.5, colors=grid_color, alpha=grid_alpha,
                  linewidths=lw, zorder=3)
        ax.hlines(ys, frame.x0 - 0.5, frame.x1 - 0.5, colors=grid_color, alpha=grid_alpha,
                  linewidths=lw, zorder=3)
    outline = dict(fill=False, zorder=4, edgecolor=label_color, linewidth=2.0)
    text = dict(color=label_color, fontsize=8.5, fontweight="bold", zorder=7, ha="left",
                va="top", bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.45,
                                    linewidth=0))
    if view.patch is not None:
        ib = view.patch.inner_box
        ax.add_patch(Rectangle((ib.x0 - 0.5, ib.y0 - 0.5), ib.width, ib.height, **outline))
        ax.text(ib.x0 + 0.01 * ib.width, ib.y1 - 0.01 * ib.height,
                f"patch {view.patch.id.x},{view.patch.id.y} inner region",
                **{**text, "fontsize": 8, "fontweight": "normal"})
    else:
        for p in geo.patches():
            ib = geo.patch_inner_box(p)
            ax.add_patch(Rectangle((ib.x0 - 0.5, ib.y0 - 0.5), ib.width, ib.height, **outline))
            ax.text(ib.x0 + 0.01 * ib.width, ib.y1 - 0.01 * ib.height, f"patch {p.x},{p.y}",
                    **text)
    ax.set_xlim(frame.x0 - 0.5, frame.x1 - 0.5)
    ax.set_ylim(frame.y0 - 0.5, frame.y1 - 0.5)


def _empty_background(ax, view: View):
    """Hatched background that shows through where a cell is empty."""
    from matplotlib.patches import Rectangle

    f = _frame(view)
    ax.add_patch(Rectangle((f.x0 - 0.5, f.y0 - 0.5), f.width, f.height, facecolor=EMPTY_COLOR,
                           edgecolor=HATCH_COLOR, hatch="///", linewidth=0, zorder=0))


def _empty_legend(ax, cm: CellMap, loc="lower right"):
    from matplotlib.patches import Patch

    if np.isfinite(cm.values).all():
        return

    ax.legend(handles=[Patch(facecolor=EMPTY_COLOR, edgecolor=HATCH_COLOR, hatch="///",
                             label="no input")], loc=loc, fontsize=8, framealpha=0.9,
              handlelength=1.6, handleheight=1.2)


def _annotate_values(ax, cm: CellMap, fmt, cmap, norm, fontsize=None):
    ny, nx = cm.values.shape
    if max(nx, ny) > 26:
        return
    fontsize = fontsize or (9 if max(nx, ny) <= 12 else 6.5)
    X, Y = cm.centres()
    for j in range(ny):
        for i in range(nx):
            v = cm.values[j, i]
            if not np.isfinite(v):
                continue
            r, g_, b, _ = cmap(norm(v))
            lum = 0.299 * r + 0.587 * g_ + 0.114 * b
            ax.text(X[j, i], Y[j, i], fmt(v), ha="center", va="center", fontsize=fontsize,
                    color="black" if lum > 0.5 else "white", zorder=6)


def depth_figure(view: View, table=None):
    """Inputs per cell."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    table = summaries(view) if table is None else table
    cm = cell_map(view, table, "n_inputs")
    fig, ax = _new_figure(view)
    _empty_background(ax, view)
    vmax = int(np.nanmax(cm.values)) if np.isfinite(cm.values).any() else 1
    vmin = max(0, int(np.nanmin(cm.values))) if np.isfinite(cm.values).any() else 0
    vmin = min(vmin, max(vmax - 1, 0))
    bounds = np.arange(vmin - 0.5, vmax + 1.5)
    cmap = colormaps["viridis"].resampled(len(bounds) - 1)
    norm = BoundaryNorm(bounds, cmap.N)
    mesh = ax.pcolormesh(cm.xedges, cm.yedges, np.ma.masked_invalid(cm.values), cmap=cmap,
                         norm=norm, zorder=1)
    _annotate_values(ax, cm, lambda v: f"{int(v)}", cmap, norm)
    _decorate(ax, view)
    ticks = np.arange(vmin, vmax + 1)
    if len(ticks) > 15:
        ticks = ticks[:: int(math.ceil(len(ticks) / 15))]
    cb = fig.colorbar(mesh, ax=ax, ticks=ticks, shrink=0.92, pad=0.02)
    cb.set_label("inputs per cell (warps in the coadd)")
    n = np.isfinite(cm.values)
    sub = (f"{int(n.sum())} populated cells · median {np.median(cm.values[n]):.0f} inputs · "
           f"max {vmax}") if n.any() else "no populated cell"
    ax.set_title(f"Depth: inputs per cell\n{view.title} — {sub}", fontsize=11)
    _empty_legend(ax, cm)
    return fig


def weight_figure(view: View, table=None):
    """Effective weight (median Σw over each inner box) per cell."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    table = summaries(view) if table is None else table
    cm = cell_map(view, table, "weight")
    fig, ax = _new_figure(view)
    _empty_background(ax, view)
    finite = cm.values[np.isfinite(cm.values)]
    vmax = float(finite.max()) if finite.size else 1.0
    cmap = colormaps["cividis"]
    scale = _pow10(vmax)
    norm = Normalize(0.0, vmax / scale)
    scaled = cm.values / scale
    mesh = ax.pcolormesh(cm.xedges, cm.yedges, np.ma.masked_invalid(scaled), cmap=cmap,
                         norm=norm, zorder=1)
    cm_scaled = CellMap(scaled, cm.x0, cm.y0, cm.step)
    _annotate_values(ax, cm_scaled, lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}", cmap,
                     norm, fontsize=8 if cm.values.shape[1] <= 12 else 6)
    _decorate(ax, view)
    cb = fig.colorbar(mesh, ax=ax, shrink=0.92, pad=0.02)
    exp = int(round(math.log10(scale)))
    unit = "nJy$^{-2}$" if exp == 0 else f"$10^{{{exp}}}$ nJy$^{{-2}}$"
    cb.set_label(f"effective weight $\\Sigma w$ (median over the cell inner box)  [{unit}]")
    med = float(np.median(finite)) if finite.size else float("nan")
    sub = (f"median Σw = {med / scale:.3g}×10$^{{{exp}}}$ nJy$^{{-2}}$ → pixel noise "
           f"1/√Σw ≈ {1 / math.sqrt(med):.3g} nJy") if finite.size else "no cell"
    ax.set_title(f"Effective weight per cell\n{view.title} — {sub}", fontsize=11)
    _empty_legend(ax, cm)
    return fig


def _pow10(v: float) -> float:
    return 10.0 ** math.floor(math.log10(v)) if v > 0 else 1.0


def _nice_sigmas(wmax: float) -> list[float]:
    smin = 1 / math.sqrt(wmax) if wmax > 0 else 1.0
    base = 10.0 ** math.floor(math.log10(smin))
    out = []
    for k in range(0, 4):
        for m in (1, 1.5, 2, 3, 5, 7):
            s = m * base * 10**k
            if s >= smin * 0.999:
                out.append(s)
    return out[:6]


def psf_figure(view: View, table=None):
    """Coadd PSF FWHM per cell with ellipticity whiskers."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    table = summaries(view) if table is None else table
    cm = cell_map(view, table, "fwhm")
    e1 = cell_map(view, table, "e1").values
    e2 = cell_map(view, table, "e2").values
    fig, ax = _new_figure(view)
    _empty_background(ax, view)
    finite = cm.values[np.isfinite(cm.values)]
    if finite.size:
        lo, hi = np.percentile(finite, [2, 98])
        pad = max(0.01, 0.05 * (hi - lo))
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.5, 1.5
    cmap = colormaps["plasma"]
    norm = Normalize(lo, hi)
    mesh = ax.pcolormesh(cm.xedges, cm.yedges, np.ma.masked_invalid(cm.values), cmap=cmap,
                         norm=norm, zorder=1)
    _decorate(ax, view, grid_alpha=0.35)
    cb = fig.colorbar(mesh, ax=ax, shrink=0.92, pad=0.02, extend="both")
    cb.set_label("coadd PSF FWHM [arcsec]  (adaptive moments, det. radius)")
    # Whiskers: length proportional to e, along the major axis.
    e = np.hypot(e1, e2)
    theta = 0.5 * np.arctan2(e2, e1)
    good = np.isfinite(e)
    emax = float(np.nanmax(e)) if good.any() else 0.0
    ref = _nice_ref(emax)
    X, Y = cm.centres()
    step = cm.step
    length_per_e = 0.85 * step / max(emax, ref)  # longest whisker ~85 % of a cell
    U = np.where(good, e * np.cos(theta), 0) * length_per_e
    V = np.where(good, e * np.sin(theta), 0) * length_per_e
    q = ax.quiver(X[good], Y[good], U[good], V[good], angles="xy", scale_units="xy", scale=1,
                  pivot="middle", headwidth=0, headlength=0, headaxislength=0,
                  width=0.005 if cm.values.shape[1] <= 12 else 0.0035, color="white",
                  edgecolor="black", linewidth=0.6, zorder=6)
    ax.quiverkey(q, 1.075, -0.035, ref * length_per_e, f"e = {ref:g}", labelpos="S",
                 coordinates="axes", color="black", labelcolor="black",
                 fontproperties={"size": 8})
    sub = (f"FWHM median {np.median(finite):.3f}″ (range {finite.min():.3f}–{finite.max():.3f}″)"
           f" · |e| median {np.nanmedian(e):.3f}") if finite.size else "no cell"
    ax.set_title(f"Coadd PSF: FWHM and ellipticity per cell\n{view.title} — {sub}",
                 fontsize=11)
    _empty_legend(ax, cm)
    return fig


def _nice_ref(emax: float) -> float:
    for r in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
        if r >= 0.5 * emax:
            return r
    return 0.2


# --------------------------------------------------------------------------- quick-look

def binning(view: View, max_px: int | None = None) -> int:
    """Block size for the quick-look: 1 up to ``max_px`` pixels across, else the smallest
    factor that brings it under and divides the patch inner size (patches stay aligned)."""
    max_px = max_px or MAX_IMAGE_PX
    geo = view.tract.geometry
    shape = (_frame(view).height, _frame(view).width)
    f = max(1, int(math.ceil(max(shape) / max_px)))
    if f > 1 and view.patch is None:
        while geo.cells.patch_inner % f:
            f += 1
    return f


def stitched_image(view: View, f: int = 1):
    """(image, sat, box) of the view, binned ``f`` x ``f`` (mean; ``sat`` where any pixel
    has SAT): one stitched patch (its cell grid), or the patches' inner regions placed in
    the tract, one patch at a time so memory stays that of one patch plus the result."""
    sat_bit = BIT["SAT"]
    if view.patch is not None:
        ccd = view.patch.stitched()
        box = _frame(view)
        ob = view.patch.outer_box
        sl = box.slices((ob.x0, ob.y0))
        image, mask = np.asarray(ccd.data)[sl], np.asarray(ccd.flags)[sl]
        return (_block_reduce(image, f), _block_reduce((mask & sat_bit) != 0, f, np.any),
                box)
    box = view.tract.inner_box
    image = np.full((box.height // f, box.width // f), np.nan, np.float32)
    sat = np.zeros(image.shape, bool)
    geo = view.tract.geometry
    for pv in view.patches:
        ccd = pv.stitched()
        ib = geo.patch_inner_box(pv.id).intersection(box)
        src = ib.slices((pv.outer_box.x0, pv.outer_box.y0))
        dst = Box(ib.x0 // f, ib.y0 // f, ib.x1 // f, ib.y1 // f).slices((box.x0, box.y0))
        image[dst] = _block_reduce(np.asarray(ccd.data)[src], f)
        sat[dst] = _block_reduce((np.asarray(ccd.flags)[src] & sat_bit) != 0, f, np.any)
        del ccd
    return image, sat, box


def _block_reduce(a: np.ndarray, f: int, fn=np.nanmean):
    if f <= 1:
        return a
    if fn is np.any:
        h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        return a[:h, :w].reshape(h // f, f, w // f, f).any(axis=(1, 3))
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    v = a[:h, :w].reshape(h // f, f, w // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(v, axis=(1, 3))


def stretch_limits(image: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax): from 2σ below the sky (clipped median) to the 99.9th percentile."""
    from astropy.stats import sigma_clipped_stats

    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    _, med, sd = sigma_clipped_stats(finite, sigma=3, maxiters=5)
    vmin = med - 2.5 * sd
    vmax = float(np.percentile(finite, 99.9))
    if not vmax > vmin:
        vmax = vmin + max(1.0, abs(vmin))
    return float(vmin), vmax


def quicklook_figure(view: View, table=None):
    """Stitched coadd, asinh stretch, cell grid, empty cells hatched, colour bar in nJy."""
    require_matplotlib()
    from astropy.visualization import AsinhStretch, ImageNormalize
    from matplotlib import colormaps
    from matplotlib.patches import Patch, Rectangle

    f = binning(view)
    disp, sat, box = stitched_image(view, f)
    vmin, vmax = stretch_limits(disp)
    # asinh with its linear part at ~ a few sky sigma: faint galaxies show, cores don't burn
    a = min(0.5, max(1e-3, 10 * (0 - vmin) / 2.5 / (vmax - vmin))) if vmax > vmin else 0.1
    norm = ImageNormalize(vmin=vmin, vmax=vmax, stretch=AsinhStretch(a=a))
    fig, ax = _new_figure(view, 8.8, 7.6)
    _empty_background(ax, view)
    cmap = colormaps["gray"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    extent = (box.x0 - 0.5, box.x0 - 0.5 + disp.shape[1] * f,
              box.y0 - 0.5, box.y0 - 0.5 + disp.shape[0] * f)
    im = ax.imshow(np.ma.masked_invalid(disp), origin="lower", cmap=cmap, norm=norm,
                   extent=extent, interpolation="nearest" if f == 1 else "antialiased",
                   zorder=1)
    # Saturated pixels: a colour overlay so that they can be spotted.
    if sat.any():
        ov = np.zeros((*sat.shape, 4))
        ov[sat] = (1.0, 0.35, 0.2, 0.55)
        ax.imshow(ov, origin="lower", extent=extent, interpolation="nearest", zorder=2)
    # Empty cells: hatched (the hatched background shows through NaN), outlined.
    geo = view.tract.geometry
    empty = _empty_cells(view)
    for (x0, y0) in empty:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), geo.cells.inner, geo.cells.inner,
                               fill=False, edgecolor="#e34a33", linewidth=0.9, zorder=4))
    _decorate(ax, view, grid_color="#4aa3df", grid_alpha=0.45, label_color="white")
    cb = fig.colorbar(im, ax=ax, shrink=0.92, pad=0.02)
    cb.set_label("surface brightness [nJy / pixel]  (asinh stretch)")
    ticks = _asinh_ticks(vmin, vmax, norm)
    cb.set_ticks(ticks)
    cb.set_ticklabels([_fmt_njy(t) for t in ticks])
    handles = [Patch(facecolor=EMPTY_COLOR, edgecolor="#e34a33", hatch="///",
                     label=f"empty cell (no input): {len(empty)}")] if empty else []
    if sat.any():
        handles.append(Patch(facecolor=(1.0, 0.35, 0.2, 0.55), label="SAT"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    n_cells = sum(len(p.generations) for p in view.patches)
    sub = f"{n_cells} populated cells · sky σ ≈ {(0 - vmin) / 2.5:.3g} nJy"
    if f > 1:
        sub += f" · binned {f}×{f}"
    ax.set_title(f"Coadd quick-look\n{view.title} — {sub}", fontsize=11)
    return fig


def _empty_cells(view: View) -> list[tuple[int, int]]:
    """Inner-box corners (tract px) of the cells in the frame that have no input."""
    geo = view.tract.geometry
    g = geo.cells
    out = []
    if view.patch is not None:
        ox, oy = geo.cell_grid_origin(view.patch.id)
        n = g.cells_per_patch
        for cy in range(n):
            for cx in range(n):
                if (cx, cy) not in view.patch.generations:
                    out.append((ox + cx * g.inner, oy + cy * g.inner))
        return out
    k, b = g.cells_per_patch_inner, g.cells_in_patch_border
    have = {pv.id: pv.generations for pv in view.patches}
    for p in geo.patches():
        gens = have.get(p, {})
        ib = geo.patch_inner_box(p)
        for iy in range(k):
            for ix in range(k):
                if (ix + b, iy + b) not in gens:
                    out.append((ib.x0 + ix * g.inner, ib.y0 + iy * g.inner))
    return out


def _asinh_ticks(vmin: float, vmax: float, norm) -> list[float]:
    """Colour-bar ticks for an asinh stretch: 0 and 1-2-5 steps, keeping only ticks at
    least 7 % of the bar apart so that labels never overlap."""
    cands = [0.0] if vmin < 0 < vmax else []
    v = _pow10(max(abs(vmin), 1e-9))
    while v <= vmax:
        cands += [k * v for k in (1, 2, 5) if k * v <= vmax]
        v *= 10
    out, last = [], -1.0
    for t in sorted(set(cands)):
        pos = float(norm(t))
        if pos - last >= 0.07:
            out.append(t)
            last = pos
    return out


def _fmt_njy(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-2:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:g}" if a >= 1 else f"{v:.2g}"


FIGURES = {"depth": depth_figure, "weight": weight_figure, "psf": psf_figure,
           "quicklook": quicklook_figure}


def make_figure(kind: str, st, band=None, tract=None, patch=None):
    """The matplotlib Figure of ``kind`` for an open state."""
    if kind not in FIGURES:
        raise UserError(f"unknown plot {kind!r}; choose from {', '.join(KINDS)}")
    require_matplotlib()
    view = select(st, band, tract, patch)
    return FIGURES[kind](view)


def save(fig, out: str | Path, dpi: int = 150) -> Path:
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise UserError(f"{out.parent}: directory does not exist")
    fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.15,
                metadata={"Software": "streamcoadd"})
    return out


# --------------------------------------------------------------------------- CLI




_mpl = require_matplotlib  # the name cli/plot.py still imports (removed with it)
