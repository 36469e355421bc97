"""Settings: the fold rules (frozen into a state at ``init``) and run-time settings.

Defaults live in ``config/streamcoadd.toml``; every key is optional there.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from streamcoadd.core.errors import UserError
from streamcoadd.core.masks import CANONICAL_PLANES


@dataclass(frozen=True)
class FoldConfig:
    """The science rules of the fold (SPEC §3). Fixed for the life of a state: changing
    them half-way would make the coadd depend on arrival order."""

    bad_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "SUSPECT", "CLIPPED")
    drop_planes: tuple[str, ...] = ("EDGE", "NOT_DEBLENDED")  # never OR-ed into the coadd
    propagate_thresholds: dict = field(default_factory=lambda: {"SAT": 0.1})
    inexact_psf_threshold: float = 0.1  # interpolated weight fraction above which INEXACT_PSF
    min_overlap_fraction: float = 1.0  # of the cell inner box covered by valid pixels
    max_maskfrac: float = 0.5  # bad fraction of the inner box above which an input is fallback
    psf_size: int = 35  # odd, px
    noise_realizations: int = 0  # NOISEk HDUs every warp must carry and that are coadded
    # a header WEIGHT may differ from 1/<variance> of the warp's good pixels by this factor
    max_weight_ratio: float = 10.0

    def __post_init__(self):
        unknown = [p for p in (*self.bad_planes, *self.drop_planes, *self.propagate_thresholds)
                   if p not in CANONICAL_PLANES]
        if unknown:
            raise UserError(f"unknown mask plane(s) in fold config: {', '.join(unknown)}; "
                            f"known: {', '.join(CANONICAL_PLANES)}")
        if self.psf_size % 2 == 0 or self.psf_size < 3:
            raise UserError(f"fold psf_size must be odd and >= 3, got {self.psf_size}")
        if not 0 < self.min_overlap_fraction <= 1:
            raise UserError("fold min_overlap_fraction must be in (0, 1]")
        if not 0 <= self.max_maskfrac <= 1:
            raise UserError("fold max_maskfrac must be in [0, 1]")
        if not self.max_weight_ratio >= 1:
            raise UserError("fold max_weight_ratio must be >= 1")
        if self.noise_realizations < 0:
            raise UserError("fold noise_realizations must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bad_planes"] = list(self.bad_planes)
        d["drop_planes"] = list(self.drop_planes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FoldConfig":
        names = {f.name for f in fields(cls)}
        extra = set(d) - names
        if extra:
            raise UserError(f"unknown [fold] setting(s): {', '.join(sorted(extra))}")
        d = dict(d)
        for k in ("bad_planes", "drop_planes"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class RunConfig:
    """How a process folds and commits; may change between runs."""

    commit_every: int = 64  # warps folded in memory per durable commit
    commit_interval: float = 30.0  # s; a commit happens at least this often while folding
    cache_gb: float = 2.0  # bound on accumulators held in memory (GB)
    prefetch: int = 1  # warps read and prepared ahead on a second thread (0: off)
    commit_processes: int = 2  # processes that write a commit's cell files (1: no fork)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        extra = set(d) - names
        if extra:
            raise UserError(f"unknown [run] setting(s): {', '.join(sorted(extra))}")
        return cls(**d)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None


# The checkout's own settings file, used when no --config is given (absent in a wheel).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "streamcoadd.toml"


def site_config(path: str | Path | None) -> dict:
    """The ``[fold]``/``[run]``/``[daemon]`` settings: ``path`` if given, else
    ``config/streamcoadd.toml`` of this checkout if present, else built-in defaults ({})."""
    if path:
        return load_toml(path)
    return load_toml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
