"""The law of distinct images' best-match similarity, fitted below the copies and extrapolated into their range.

An image's best match among many distinct images is a maximum, so its law is a generalised extreme value law
(Fisher-Tippett-Gnedenko). ``dedup_copy``'s calibration fits one to the bulk of the pool's best matches and reads
its tail as the rate of false matches above a threshold (:func:`lvdkit.curation.dedup_copy.calibrate`).
"""

from __future__ import annotations

import numpy as np

TAIL_HI = 0.85  # the highest quantile of the best matches the law is fitted to (calibrate lowers it below the copies)
TAIL_SHAPES = np.linspace(-0.5, 0.0, 51)  # extreme-value shapes the fit tries: bounded (cosines) up to Gumbel


def distinct_tail(
    best: np.ndarray, lo: float = 0.05, hi: float = TAIL_HI, above: float = 0.0
) -> tuple[float, float, float]:
    """Extreme-value law (location, scale, shape) of distinct images' best match, fitted by least squares to the
    ``lo``..``hi`` quantiles of ``best`` [N], of which a share ``above`` lies above them all (copies).

    An image's best match among many distinct images is a maximum, so its law is a generalised extreme value law
    (Fisher-Tippett). The fit leaves out the top of ``best``, where the copies are, and extrapolates the distinct
    images' law into it: quantile q of ``best`` is quantile q / (1 - above) of theirs. The shape is searched from
    -0.5 to 0 (Gumbel): a bounded tail (cosines are at most 1; a few dimensions, tight clusters) is allowed, a tail
    heavier than Gumbel's is not. For a fixed shape the quantiles are linear in location and scale.
    """
    q = np.linspace(lo, hi, 33)
    reduced = -np.log(np.clip(q / (1.0 - above), 1e-9, 1.0 - 1e-9))  # -log F at each quantile
    x = np.quantile(best, q)
    fits = []
    for shape in TAIL_SHAPES:
        g = -np.log(reduced) if shape == 0 else (reduced ** (-shape) - 1.0) / shape
        design = np.stack([np.ones_like(g), g], axis=1)
        (location, scale), *_ = np.linalg.lstsq(design, x, rcond=None)
        fits.append((float(np.sum((design @ (location, scale) - x) ** 2)), float(location), float(scale), shape))
    _, location, scale, shape = min(fits)
    return location, max(scale, 1e-6), float(shape)


def gev_sf(t: np.ndarray, location: float, scale: float, shape: float) -> np.ndarray:
    """P(X > t) for a generalised extreme value law (shape 0: Gumbel; below 0: bounded above); [T] -> [T]."""
    z = (np.asarray(t, np.float64) - location) / scale
    if shape == 0:
        return -np.expm1(-np.exp(-z))
    base = 1.0 + shape * z
    outside = 0.0 if shape < 0 else 1.0  # above the upper end (shape < 0), below the lower end (shape > 0)
    with np.errstate(over="ignore"):
        inside = -np.expm1(-np.power(np.maximum(base, 1e-300), -1.0 / shape))
    return np.where(base > 0, inside, outside)
