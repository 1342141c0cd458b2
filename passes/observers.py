"""Calibration observers for int8 post-training quantization: streaming histograms and clipping ranges.

A `Histogram` sees one tensor's values over every calibration sample. It covers a symmetric range
[-R, R] with a fixed number of equal bins, so its memory is the bin count however many samples it
sees. R starts at the first nonzero max|x|; a batch with values beyond R doubles R (as often as
needed) and merges each pair of adjacent bins into one bin of the middle half. The merge is exact:
a value's bin is floor(fl(x/R) * bins/2), and halving fl(x/R) is exact in floating point, so the
merged counts are the counts the final range would have given (values exactly at +R, the closed top
edge, are kept apart until a doubling moves them inside). Exact min, max and count ride along.

An observer reads a histogram and returns the range (lo, hi) to quantize with:

- `minmax`: the exact min and max.
- `percentile`: the `percent` percentile of |x| (symmetric) or the two-sided percentiles of x,
  interpolated within a bin.
- `entropy`: TensorRT's KL-divergence calibration over the histogram of |x| with 128 levels.
- `mse`: the threshold with the smallest expected squared error of an 8-bit quantizer
  (rounding inside the range, clipping outside), values taken as uniform within each bin.

Symmetric observers return (-t, t); asymmetric ones return lo <= 0 <= hi, so zero is exactly
representable. `qparams` turns a range into a scale and zero point for int8 or uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


class Histogram:
    """Streaming histogram of one tensor's finite values over [-bound, bound] in `bins` equal bins."""

    def __init__(self, bins: int = 2048) -> None:
        # The old range [-R, R] must start on an edge of the doubled one: -R = -2R + (bins/4) * (4R/bins).
        if bins < 4 or bins % 4:
            raise ValueError(f"bins must be a positive multiple of 4, not {bins}")
        self.bins = bins
        self.bound = 0.0  # R; 0 until a nonzero value is seen
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self._counts = np.zeros(bins, dtype=np.int64)
        self._top = 0  # values exactly at +bound (the closed top edge)

    @property
    def counts(self) -> np.ndarray:
        """Counts per bin (bin i covers [edges[i], edges[i+1]), the last bin also its top edge)."""
        counts = self._counts.copy()
        counts[-1] += self._top
        return counts

    @property
    def width(self) -> float:
        return 2 * self.bound / self.bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.bound, self.bound, self.bins + 1)

    def update(self, values: np.ndarray) -> None:
        """Adds a batch of any shape; NaN and +-inf are left out (of counts, min, max and count)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        peak = max(-lo, hi)
        half = self.bins // 2
        if peak == 0:
            self._counts[half] += x.size  # zero is the lower edge of bin bins/2 at every range
            return
        if self.bound == 0:
            self.bound = peak
        while self.bound < peak:
            self._double()
        index = np.floor(x / self.bound * half).astype(np.int64) + half  # in [0, bins]
        top = index == self.bins
        self._top += int(top.sum())
        self._counts += np.bincount(index[~top], minlength=self.bins)

    def _double(self) -> None:
        quarter = self.bins // 4
        merged = np.zeros_like(self._counts)
        merged[quarter : 3 * quarter] = self._counts.reshape(-1, 2).sum(axis=1)
        merged[3 * quarter] += self._top  # the old top edge is the lower edge of bin 3*bins/4
        self._counts, self._top = merged, 0
        self.bound *= 2


Range = tuple[float, float]


def _peak(hist: Histogram) -> float:
    return max(-hist.min, hist.max, 0.0) if hist.count else 0.0


def _abs_counts(hist: Histogram) -> np.ndarray:
    """Histogram of |x|: bins/2 bins of `hist.width` over [0, bound]."""
    counts = hist.counts
    half = hist.bins // 2
    return counts[half:] + counts[:half][::-1]


def _quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """The q-quantile (0..1) of a histogram whose first bin starts at `start`, linear within a bin."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    if target <= 0:
        return start
    k = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[k] - counts[k]
    return float(start + width * (k + (target - before) / counts[k]))


def _with_zero(lo: float, hi: float) -> Range:
    return min(lo, 0.0), max(hi, 0.0)


def _clip_to_data(hist: Histogram, t: float) -> Range:
    """The asymmetric range of a symmetric threshold: [-t, t] clipped to the data, holding zero."""
    return _with_zero(max(-t, hist.min), min(t, hist.max))


def minmax(hist: Histogram, symmetric: bool) -> Range:
    if hist.count == 0:
        return 0.0, 0.0
    if symmetric:
        t = _peak(hist)
        return -t, t
    return _with_zero(hist.min, hist.max)


def percentile(hist: Histogram, symmetric: bool, percent: float = 99.99) -> Range:
    """Symmetric: t = the `percent` percentile of |x|. Asymmetric: the (100 - percent) and `percent`
    percentiles of x, kept within the exact min/max, then widened to hold zero."""
    if _peak(hist) == 0:
        return 0.0, 0.0
    if symmetric:
        t = min(_quantile(_abs_counts(hist), 0.0, hist.width, percent / 100), _peak(hist))
        return -t, t
    counts, start, width = hist.counts, -hist.bound, hist.width
    lo = _quantile(counts, start, width, 1 - percent / 100)
    hi = _quantile(counts, start, width, percent / 100)
    return _with_zero(min(max(lo, hist.min), hist.max), max(min(hi, hist.max), hist.min))


ENTROPY_LEVELS = 128  # TensorRT's: the levels 0..127 of |x| an int8 value holds on one side
_EMPTY_LEVEL_MASS = 1e-4  # counts given to a bin of P that Q leaves empty (MXNet's and TVM's smoothing eps)


def _kl_of_clip(counts: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for keeping the first `i` bins of |x| (TensorRT's calibration step).

    P is the first i bins with the clipped outliers added into the last one. Q quantizes the first
    i bins as they are (outliers left out, as in TensorRT's reference) into `levels` levels and
    spreads each level's mass evenly over its bins where P is nonzero. A bin where P has mass and Q
    none (outliers landing in an empty level) gets a tiny mass so the divergence stays finite.
    (Quantizing P itself instead would make Q == P at 128 bins: KL 0, the smallest threshold always.)
    """
    sliced = counts[:i].astype(np.float64)
    p = sliced.copy()
    p[-1] += counts[i:].sum()
    nonzero = p > 0
    level = np.arange(i) * levels // i
    mass = np.bincount(level, weights=sliced, minlength=levels)
    spread = np.bincount(level, weights=nonzero, minlength=levels)
    q = np.where(nonzero, mass[level] / np.maximum(spread[level], 1), 0.0)
    q[nonzero & (q == 0)] = _EMPTY_LEVEL_MASS
    p, q = p[nonzero] / p.sum(), q[nonzero] / q.sum()
    return float(np.sum(p * np.log(p / q)))


def entropy(hist: Histogram, symmetric: bool) -> Range:
    """TensorRT's KL calibration on the |x| histogram (bins/2 bins), 128 levels, thresholds at the
    upper edge of bins 128 .. the last nonzero bin; the smallest threshold among equal divergences.
    Asymmetric: the same threshold clipped to the data's min/max, widened to hold zero."""
    t = _peak(hist)
    if t == 0:
        return 0.0, 0.0
    counts = _abs_counts(hist)
    last = int(np.flatnonzero(counts)[-1]) + 1
    if last > ENTROPY_LEVELS:
        kls = [_kl_of_clip(counts, i, ENTROPY_LEVELS) for i in range(ENTROPY_LEVELS, last + 1)]
        t = min((int(np.argmin(kls)) + ENTROPY_LEVELS) * hist.width, t)
    return (-t, t) if symmetric else _clip_to_data(hist, t)


MSE_CANDIDATES = 500  # thresholds (or alphas) from 1% to 100% of the data's extent


def _pos(v: np.ndarray) -> np.ndarray:
    return np.maximum(v, 0.0)


def _expected_sq_error(hist: Histogram, lo: np.ndarray, hi: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Sum of squared quantization errors, per candidate, of a quantizer representing [lo, hi] in
    steps of `step`: step^2/12 per value inside, the squared distance to the range per value outside.
    Values are uniform within each bin, so a bin the range cuts counts partly in, partly out."""
    counts = hist.counts
    keep = counts > 0
    a = hist.edges[:-1][keep][None, :]
    b = hist.edges[1:][keep][None, :]
    n = counts[keep][None, :].astype(np.float64)
    lo, hi, step = lo[:, None], hi[:, None], step[:, None]
    inside = _pos(np.minimum(b, hi) - np.maximum(a, lo)) * step**2 / 12
    above = (_pos(b - hi) ** 3 - _pos(a - hi) ** 3) / 3
    below = (_pos(lo - a) ** 3 - _pos(lo - b) ** 3) / 3
    return np.sum(n / (b - a) * (inside + above + below), axis=1)


def mse(hist: Histogram, symmetric: bool) -> Range:
    """The clipping range with the smallest expected squared error of an 8-bit quantizer.
    Symmetric int8: t = f * max|x|, scale t/127, levels -127..127. Asymmetric uint8:
    (lo, hi) = f * (min, max) (widened to hold zero), scale (hi-lo)/255 and the rounded zero point.
    f runs over `MSE_CANDIDATES` values from 0.01 to 1."""
    peak = _peak(hist)
    if peak == 0:
        return 0.0, 0.0
    f = np.linspace(0.01, 1.0, MSE_CANDIDATES)
    if symmetric:
        t = f * peak
        err = _expected_sq_error(hist, -t, t, t / 127)
        best = float(t[np.argmin(err)])
        return -best, best
    lo0, hi0 = _with_zero(hist.min, hist.max)
    lo, hi = f * lo0, f * hi0
    scale = (hi - lo) / 255
    zero_point = np.clip(np.round(-lo / scale), 0, 255)
    err = _expected_sq_error(hist, -zero_point * scale, (255 - zero_point) * scale, scale)
    k = int(np.argmin(err))
    return float(lo[k]), float(hi[k])


Observer = Callable[[Histogram, bool], Range]
OBSERVERS: dict[str, Observer] = {"minmax": minmax, "percentile": percentile, "entropy": entropy, "mse": mse}
# mse by default: on MiniLM (held-out sentences, uint8) it kept embedding cosine >= 0.992, where
# percentile 99.99 gave 0.986 and entropy 0.924 (transformer activations carry outliers that matter).
DEFAULT_OBSERVER = "mse"


def qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """(scale, zero_point) for a range: int8 symmetric (zero point 0, scale max|x|/127) or uint8
    asymmetric (scale (hi-lo)/255, zero point round(-lo/scale) in [0, 255]). A zero range gives scale 1."""
    if dtype == "int8":
        extent = max(abs(lo), abs(hi))
        return (extent / 127 if extent > 0 else 1.0), 0
    if dtype == "uint8":
        scale = (hi - lo) / 255
        if not scale > 0:
            return 1.0, 0
        return scale, int(min(max(round(-lo / scale), 0), 255))
    raise ValueError(f"unsupported quantized dtype {dtype!r} (int8 or uint8)")
