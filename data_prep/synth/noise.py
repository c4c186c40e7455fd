"""Hashed value noise and box-filtered patterns, evaluated at arbitrary 3-D points.

Everything is a pure function of its coordinates (no state, no RNG), so a texture
evaluated in an object's own coordinates moves with the object, and the same seed
gives the same image in every worker process.

Anti-aliasing is analytic: callers pass each point's *footprint* (metres covered
by one pixel there), and octaves or pattern edges finer than the footprint fade
out. Rendering one ray per pixel then gives images without aliasing salt, which
matters because self-supervised depth compares bilinearly warped frames.
"""

from __future__ import annotations

import numpy as np

# Octave n is attenuated when its wavelength shrinks below FADE_FULL footprints and
# gone below FADE_ZERO: a feature a few pixels wide still survives bilinear warping.
FADE_FULL = 5.0
FADE_ZERO = 2.5
# Pattern edges (window frames, lane markings) are box-filtered over this many pixels:
# a 1-px ramp is what a camera records, but bilinear resampling of it between two views
# still leaves errors; a slightly softer edge warps almost exactly.
EDGE_WIDTH = 1.5

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_PX, _PY, _PZ = np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F)


def _rotations(n: int) -> np.ndarray:
    # Each octave is sampled in a rotated frame so lattice axes do not line up
    # across octaves (grid artefacts) or with the axis-aligned geometry.
    rng = np.random.default_rng(20211121)
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        out.append(q * np.sign(np.diag(r)))
    return np.stack(out).astype(np.float32)


_ROT = _rotations(8)
_OCTAVE_SHIFT = np.random.default_rng(7).uniform(0, 1000, size=(8, 3)).astype(np.float32)


def mix32(h: np.ndarray) -> np.ndarray:
    """Avalanche a uint32 array (lowbias32 finaliser); wraps silently. ``h`` is not modified."""
    h = h ^ (h >> np.uint32(16))
    # in place from here on: integer ops, so the result is exact whatever the temporaries
    h *= _M1
    h ^= h >> np.uint32(15)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def _to_unit(h: np.ndarray) -> np.ndarray:
    x = h.astype(np.float32)
    x *= np.float32(2.0 / 4294967296.0)  # the same float32 operations as x * a - 1, without temporaries
    x -= np.float32(1.0)
    return x


def _lattice(x: np.ndarray) -> np.ndarray:
    # int64 first: negative coordinates wrap into uint32 instead of raising
    return np.floor(x).astype(np.int64).astype(np.uint32)


def cell_hash(*coords: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random value in [-1, 1) per integer cell (piecewise-constant noise), float32."""
    h = np.full(np.shape(coords[0]), np.uint32(seed * 0x9E3779B1 & 0xFFFFFFFF), dtype=np.uint32)
    for c, p in zip(coords, (_PX, _PY, _PZ)):
        h = mix32(h + _lattice(c) * p)
    return _to_unit(h)


def value_noise(p: np.ndarray) -> np.ndarray:
    """Smooth 3-D value noise in [-1, 1] at points ``p`` (N,3), float32, quintic blend."""
    cell = np.floor(p)
    f = (p - cell).astype(np.float32, copy=False)
    c = cell.astype(np.int64).astype(np.uint32)
    hx = (c[:, 0] * _PX, c[:, 0] * _PX + _PX)
    hy = (c[:, 1] * _PY, c[:, 1] * _PY + _PY)
    hz = (c[:, 2] * _PZ, c[:, 2] * _PZ + _PZ)
    w = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    corner = {}
    for i in (0, 1):
        for j in (0, 1):
            hxy = hx[i] + hy[j]
            for k in (0, 1):
                corner[i, j, k] = _to_unit(mix32(hxy + hz[k]))
    x00 = corner[0, 0, 0] + wx * (corner[1, 0, 0] - corner[0, 0, 0])
    x10 = corner[0, 1, 0] + wx * (corner[1, 1, 0] - corner[0, 1, 0])
    x01 = corner[0, 0, 1] + wx * (corner[1, 0, 1] - corner[0, 0, 1])
    x11 = corner[0, 1, 1] + wx * (corner[1, 1, 1] - corner[0, 1, 1])
    y0 = x00 + wy * (x10 - x00)
    y1 = x01 + wy * (x11 - x01)
    return y0 + wz * (y1 - y0)


def octave_fade(wavelength: np.ndarray | float, footprint: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of a feature of this wavelength at this footprint (1 = fully resolved)."""
    ratio = np.asarray(wavelength, dtype=np.float32) / np.maximum(footprint, 1e-6)
    return np.clip((ratio - FADE_ZERO) / (FADE_FULL - FADE_ZERO), 0.0, 1.0).astype(np.float32)


def fbm(
    p: np.ndarray,
    footprint: np.ndarray,
    wavelength: np.ndarray | float,
    octaves: int = 5,
    gain: float = 0.5,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Footprint-filtered fractal noise, roughly in [-1, 1].

    Args:
        p: (N,3) points in object coordinates (metres).
        footprint: (N,) metres per pixel at each point.
        wavelength: scalar or (N,) wavelength of the coarsest octave (metres).
        octaves: number of octaves; each halves the wavelength and multiplies amplitude by ``gain``.
        offset: optional (N,3) or (3,) shift, decorrelating objects that share a material.

    Returns:
        (N,) float32. Octaves too fine for the footprint are faded out (not renormalised,
        so distant surfaces lose contrast the way a real pixel averages them).
    """
    p = np.asarray(p, dtype=np.float32)
    if offset is not None:
        p = p + np.asarray(offset, dtype=np.float32)
    lam = np.broadcast_to(np.asarray(wavelength, dtype=np.float32), footprint.shape)
    total = np.zeros(len(p), dtype=np.float32)
    # normalised over all octaves, whatever the cut-off, so filtering only removes detail
    norm = sum(gain**k for k in range(octaves))
    amp = 1.0
    for k in range(octaves):
        lam_k = lam / np.float32(2**k)
        weight = octave_fade(lam_k, footprint)
        live = weight > 0
        if not live.any():
            break
        if live.all():
            q = (p / lam_k[:, None]) @ _ROT[k % len(_ROT)] + _OCTAVE_SHIFT[k % len(_OCTAVE_SHIFT)]
            total += np.float32(amp) * weight * value_noise(q)
        else:  # only the points where this octave survives (``take``: a fast gather)
            idx = np.nonzero(live)[0]
            q = (p.take(idx, axis=0) / lam_k.take(idx)[:, None]) @ _ROT[k % len(_ROT)]
            q += _OCTAVE_SHIFT[k % len(_OCTAVE_SHIFT)]
            total[idx] += np.float32(amp) * weight.take(idx) * value_noise(q)
        amp *= gain
    return total * np.float32(1.7 / norm)


def _pulse_integral(x: np.ndarray, period: float | np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray):
    k = np.floor(x / period)
    r = x - k * period
    return k * (hi - lo) + np.clip(r - lo, 0.0, hi - lo)


def pulse(
    x: np.ndarray,
    period: float | np.ndarray,
    lo: float | np.ndarray,
    hi: float | np.ndarray,
    footprint: np.ndarray,
) -> np.ndarray:
    """Box-filtered periodic indicator of ``lo <= x mod period < hi`` (exact for a 1-px box).

    With an infinite period this is a filtered step pair, useful for single stripes.
    """
    w = np.maximum(footprint * EDGE_WIDTH, 1e-6)
    out = (_pulse_integral(x + 0.5 * w, period, lo, hi) - _pulse_integral(x - 0.5 * w, period, lo, hi)) / w
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def band(x: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Box-filtered indicator of ``lo <= x < hi`` (a single, non-repeating stripe)."""
    w = np.maximum(footprint * EDGE_WIDTH, 1e-6)
    a = np.clip(x + 0.5 * w, lo, hi) - np.clip(x - 0.5 * w, lo, hi)
    return np.clip(a / w, 0.0, 1.0).astype(np.float32)
