"""Materials, lighting and tone mapping: traced hits -> an RGB frame.

Shading is view-independent (Lambertian sun + hemispherical sky light, sun shadows
cast by static geometry only, emissive lamps), so a static point has the same
colour in every frame -- the photometric-consistency assumption self-supervised
depth relies on. The only view-dependent terms are mild distance haze and the
footprint-based texture filtering, both of which real cameras share.

All colours are linear RGB in [0, 1] until :func:`tone_map`; palettes and colour
parameters are stored as sRGB 0..255 and converted here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_prep.synth import materials as M
from data_prep.synth.geometry import ELLIPSOID, GROUND, Camera, Scene, Trace
from data_prep.synth.noise import band, cell_hash, fbm, octave_fade, pulse
from data_prep.synth.styles import Style

MAX_ANISOTROPY = 6.0  # grazing surfaces are filtered at most this much more along the slope


def lin(c) -> np.ndarray:
    """sRGB 0..255 (any shape, last axis 3) -> linear RGB float32."""
    return ((np.asarray(c, dtype=np.float32) / 255.0) ** 2.2).astype(np.float32)


@dataclass(frozen=True)
class Lighting:
    """Per-sample light: directions in world coordinates, colours linear."""

    sun_dir: np.ndarray  # (3,) unit vector towards the sun
    sun: np.ndarray  # (3,) sun irradiance colour
    sky_light: np.ndarray  # (3,) hemispherical sky irradiance colour
    zenith: np.ndarray  # (3,) sky colour straight up
    horizon: np.ndarray  # (3,) sky colour at the horizon (and haze colour)
    clouds: float  # cloud cover in [0, 1]
    haze: float  # haze distance in metres
    exposure: float
    cloud_offset: np.ndarray  # (3,) decorrelates cloud patterns between samples


def sample_lighting(rng: np.random.Generator, style: Style) -> Lighting:
    """Random sun position and strengths within the style's ranges."""
    elev = math.radians(rng.uniform(*style.sun_elevation_deg))
    az = rng.uniform(-math.pi, math.pi)
    sun_dir = np.array([math.cos(elev) * math.sin(az), math.sin(elev), math.cos(elev) * math.cos(az)])
    k = int(rng.integers(len(style.sky_zenith)))
    clouds = rng.uniform(*style.cloud_amount)
    # overcast skies dim the sun and brighten the sky light
    sun = rng.uniform(*style.sun_strength) * (1.0 - 0.6 * clouds)
    amb = rng.uniform(*style.ambient_strength) * (1.0 + 0.3 * clouds)
    return Lighting(
        sun_dir=sun_dir,
        sun=lin(style.sun_color) * sun,
        sky_light=lin(style.sky_light_color) * amb,
        zenith=lin(style.sky_zenith[k]),
        horizon=lin(style.sky_horizon[k % len(style.sky_horizon)]),
        clouds=clouds,
        haze=rng.uniform(*style.haze_distance),
        exposure=rng.uniform(*style.exposure),
        cloud_offset=rng.uniform(-1e4, 1e4, size=3),
    )


@dataclass
class Surface:
    """Attributes of the M pixels that share one pattern (all float32 / local frame)."""

    p: np.ndarray  # (M,3) hit point, primitive-local
    n: np.ndarray  # (M,3) normal, primitive-local
    fp: np.ndarray  # (M,) footprint along the steepest direction (metres per pixel)
    fpi: np.ndarray  # (M,) isotropic footprint (metres per pixel across the ray)
    color: np.ndarray  # (M,3) linear base colour
    amp: np.ndarray  # (M,)
    wl: np.ndarray  # (M,) noise wavelength
    params: np.ndarray  # (M,12)
    offset: np.ndarray  # (M,3)
    size: np.ndarray  # (M,3) primitive half extents / radii
    road: dict
    style: Style

    def noise(self, scale: float = 1.0, octaves: int = 6, shift: float = 0.0, gain: float = 0.5) -> np.ndarray:
        """Filtered fractal noise at the points, wavelength ``scale`` x the material's."""
        return fbm(self.p, self.fp, self.wl * scale, octaves=octaves, gain=gain, offset=self.offset + shift)

    def base(self) -> np.ndarray:
        """Base colour modulated by the material noise."""
        return self.color * np.maximum(1.0 + self.amp * self.noise(), 0.05)[:, None]


def _mix(a: np.ndarray, b, w: np.ndarray) -> np.ndarray:
    return a + (np.asarray(b, dtype=np.float32) - a) * w[:, None]


def _face(s: Surface, axis: int, sign: float = 0.0) -> np.ndarray:
    """Pixels whose local normal points along ``axis`` (either way when sign == 0)."""
    n = s.n[:, axis]
    return (np.abs(n) > 0.5) if sign == 0 else (n * sign > 0.5)


# ---- patterns: Surface -> (albedo (M,3), emission (M,3) or None) ----


def plain(s: Surface):
    return s.base(), None


def road(s: Surface):
    rd = s.road
    x, z = s.p[:, 0], s.p[:, 2]
    fx, fz = s.fpi, s.fp  # across / along the street (the road is seen at grazing angles along Z)
    # asphalt grain keeps more of its fine octaves (gain 0.65) than other materials
    grain = np.maximum(1.0 + s.amp * s.noise(octaves=7, gain=0.65), 0.05)
    alb = s.color * (grain * (1.0 + 0.12 * s.noise(scale=5.0, octaves=2, shift=31.0)))[:, None]
    rw, lw, lanes, park = rd["half_width"], rd["lane_width"], rd["lanes"], rd["parking"]
    # darker wheel tracks along each travel lane: smooth, so nothing to alias
    track = np.zeros_like(x)
    for j in range(lanes):
        for c in ((j + 0.5) * lw, -(j + 0.5) * lw):
            for dx in (-0.85, 0.85):
                track += np.exp(-(((x - c - dx) / 0.35) ** 2))
    alb *= (1.0 - 0.1 * np.clip(track, 0, 1))[:, None]
    on_road = band(x, -rw + 0.05, rw - 0.05, fx)
    inter = rd["intersection"]
    if inter is not None:
        on_road *= 1.0 - band(z, inter[0], inter[1], fz)
    dashes = pulse(z, 9.0, 0.0, 3.0, fz)
    w = 0.065
    m = np.zeros_like(x)
    if rd["solid_centre"]:
        m += band(x, -0.2, -0.2 + 2 * w, fx) + band(x, 0.2 - 2 * w, 0.2, fx)
    else:
        m += band(x, -w, w, fx) * dashes
    for k in range(1, lanes):
        for c in (k * lw, -k * lw):
            m += band(x, c - w, c + w, fx) * dashes
    if rd["parking_line"]:
        edge = rw - park if park > 0 else rw - 0.35
        for c in (edge, -edge):
            m += band(x, c - w, c + w, fx)
    cross = rd["crossing"]
    if cross is not None:
        m += band(z, cross[0], cross[1], fz) * pulse(x + 0.25, 1.0, 0.0, 0.5, fx) * band(x, -rw + 0.4, rw - 0.4, fx)
        m += band(z, cross[0] - 0.9, cross[0] - 0.5, fz) * band(x, 0.0, rw - park, fx)
    wear = np.clip(0.75 + 0.5 * s.noise(scale=0.25, octaves=3, shift=77.0), 0.0, 1.0)
    m = np.clip(m, 0, 1) * on_road * wear
    alb = _mix(alb, lin(rd["marking"]), m)
    if rd["tram"] is not None:
        for c in (rd["tram"] - 0.72, rd["tram"] + 0.72):
            alb = _mix(alb, lin((150, 150, 155)), 0.8 * band(x, c - 0.04, c + 0.04, fx))
            alb = _mix(alb, lin((30, 30, 30)), 0.8 * band(x, c + 0.04, c + 0.09, fx))
    return alb, None


def sidewalk(s: Surface):
    alb = s.base()
    kerb = lin(s.params[:, 0:3])
    tile = s.params[:, 3]
    side = s.params[:, 4]
    top = _face(s, 1, 1.0)
    px, pz = s.p[:, 0], s.p[:, 2]
    joint = np.maximum(pulse(px, tile, 0.0, 0.03, s.fp), pulse(pz, tile, 0.0, 0.03, s.fp))
    var = cell_hash(px / tile, pz / tile, seed=3) * octave_fade(tile, s.fp)
    paved = alb * (1.0 + 0.1 * var)[:, None] * (1.0 - 0.35 * joint)[:, None]
    # a kerb-stone band along the road edge of the top face
    edge = -side * s.size[:, 0]
    kerb_band = (side != 0) * band(np.abs(px - edge), -1.0, 0.22, s.fpi)
    top_col = paved + (kerb * (1.0 + 0.6 * s.amp * s.noise(0.3))[:, None] - paved) * kerb_band[:, None]
    side_col = kerb * (1.0 + s.amp * s.noise(0.3))[:, None]
    return np.where(top[:, None], top_col, side_col), None


def facade(s: Surface):
    fh, period, ww, wh, shop, has_win = (s.params[:, i] for i in range(6))
    roof = lin(s.params[:, 6:9])
    glass = lin(s.params[:, 9:12])
    he = s.size
    y = s.p[:, 1] + he[:, 1]
    along_z = _face(s, 0)
    h = np.where(along_z, s.p[:, 2], s.p[:, 0])
    fp = s.fp
    alb = s.base()
    alb *= (0.82 + 0.18 * np.clip(y / 1.5, 0, 1))[:, None]  # grime near the pavement
    alb *= (1.0 - 0.12 * pulse(y, fh, 0.0, 0.18, fp))[:, None]  # floor cornices
    u = h + 0.5 * period
    wx = pulse(u, period, period * (0.5 - ww / 2), period * (0.5 + ww / 2), fp)
    wy = pulse(y, fh, fh * (0.55 - wh / 2), fh * (0.55 + wh / 2), fp)
    frame_x = pulse(u, period, period * (0.5 - ww / 2) - 0.1, period * (0.5 + ww / 2) + 0.1, fp)
    frame_y = pulse(y, fh, fh * (0.55 - wh / 2) - 0.1, fh * (0.55 + wh / 2) + 0.1, fp)
    upper = band(y, fh, he[:, 1] * 2 - 0.9, fp)
    win = wx * wy * upper * has_win
    frame = np.clip(frame_x * frame_y * upper * has_win - win, 0, 1)
    # shop fronts: wide windows over most of the ground floor
    sx = pulse(h + period, 2 * period, 0.25 * period, 1.85 * period, fp)
    shopwin = shop * sx * band(y, 0.5, fh - 0.45, fp)
    sign_band = shop * band(y, fh - 0.4, fh - 0.05, fp)
    ground_win = (1 - shop) * has_win * wx * band(y, 0.9, fh - 0.6, fp)
    win = np.clip(win + shopwin + ground_win, 0, 1)
    cell = cell_hash(np.floor(u / period), np.floor(y / fh), seed=11) * octave_fade(period, fp)
    glass_col = glass * (1.0 + 0.35 * cell + 0.25 * s.noise(0.5, 3, 5.0))[:, None]
    alb = _mix(alb, lin((225, 222, 214)), 0.6 * frame)
    alb = alb * (1.0 - 0.4 * sign_band)[:, None]  # dark fascia above the shop windows
    alb = alb + (glass_col - alb) * win[:, None]
    top = _face(s, 1, 1.0)
    roof_col = roof * (1.0 + 0.15 * s.noise(2.0))[:, None]
    return np.where(top[:, None], roof_col, alb), None


def foliage(s: Surface):
    light = lin(s.params[:, 0:3])
    m = np.clip(0.5 + 0.9 * s.noise(octaves=4), 0, 1)
    alb = s.color + (light - s.color) * m[:, None]
    alb *= np.maximum(1.0 + 0.35 * s.noise(0.25, 3, 9.0), 0.2)[:, None]
    v = np.clip((s.p[:, 1] / np.maximum(s.size[:, 1], 1e-3) + 1) / 2, 0, 1)
    return alb * (0.5 + 0.5 * v**0.7)[:, None], None


def grass(s: Surface):
    soil = lin(s.params[:, 0:3])
    patches = np.clip((s.noise(3.0, 3, 13.0) - 0.1) * 2.0, 0, 1)
    alb = s.color + (soil - s.color) * (0.7 * patches)[:, None]
    return alb * np.maximum(1.0 + s.amp * s.noise(0.4, 5, 2.0), 0.2)[:, None], None


def vehicle(s: Surface):
    alb = s.base()
    he = s.size
    x, y = s.p[:, 0], s.p[:, 1]
    fp = s.fpi
    bottom = band(y, -he[:, 1] - 1, -he[:, 1] + 0.16, fp) * (1 - _face(s, 1))
    alb = _mix(alb, lin((25, 25, 27)), 0.85 * bottom)
    ends = _face(s, 2)
    front = s.n[:, 2] > 0.5
    lamp = band(np.abs(x), he[:, 0] - 0.42, he[:, 0] - 0.08, fp) * band(y, he[:, 1] - 0.32, he[:, 1] - 0.1, fp) * ends
    lamp_col = np.where(front[:, None], lin((235, 235, 220)), lin((170, 20, 20)))
    plate = band(np.abs(x), -1, 0.26, fp) * band(y, -he[:, 1] + 0.17, -he[:, 1] + 0.3, fp) * ends
    grille = band(np.abs(x), -1, 0.5, fp) * band(y, -he[:, 1] + 0.3, he[:, 1] - 0.3, fp) * front
    alb = _mix(alb, lin((20, 20, 22)), 0.7 * grille)
    alb = alb + (lamp_col - alb) * lamp[:, None]
    alb = _mix(alb, lin((225, 225, 225)), plate)
    emission = lamp_col * (0.15 * lamp)[:, None]
    return alb, emission


def _glass(s: Surface, y: np.ndarray, half: np.ndarray) -> np.ndarray:
    # darker at the bottom, a sky reflection at the top; fixed to the object, not the view
    g = lin((40, 46, 54)) * (0.6 + 0.9 * np.clip((y + half) / (2 * half), 0, 1))[:, None]
    return g * (1.0 + 0.2 * s.noise(0.5, 3, 21.0))[:, None]


def cabin(s: Surface):
    alb = s.base()
    he = s.size
    x, y, z = s.p[:, 0], s.p[:, 1], s.p[:, 2]
    fp = s.fpi
    sides = _face(s, 0)
    ends = _face(s, 2)
    vy = band(y, -he[:, 1] + 0.04, he[:, 1] - 0.07, fp)
    side_win = vy * band(np.abs(z), -1, he[:, 2] - 0.12, fp) * (1 - band(z, 0.05 * he[:, 2], 0.05 * he[:, 2] + 0.1, fp))
    end_win = vy * band(np.abs(x), -1, he[:, 0] - 0.09, fp)
    win = side_win * sides + end_win * ends
    return alb + (_glass(s, y, he[:, 1]) - alb) * win[:, None], None


def bus(s: Surface):
    alb = s.base()
    lo, hi, pillar, truck = (s.params[:, i] for i in range(4))
    he = s.size
    x, y, z = s.p[:, 0], s.p[:, 1] + he[:, 1], s.p[:, 2]
    fp = s.fpi
    sides = _face(s, 0)
    front = s.n[:, 2] > 0.5
    rear = s.n[:, 2] < -0.5
    vy = band(y, lo, hi, fp)
    pil = np.where(
        truck > 0,
        band(z, 0.1, he[:, 2] - 0.15, fp),
        pulse(z, np.maximum(pillar, 0.5), 0.12, np.maximum(pillar, 0.5) - 0.06, fp),
    )
    win = vy * pil * sides
    win += band(y, np.where(truck > 0, lo, lo - 0.5), hi, fp) * band(np.abs(x), -1, he[:, 0] - 0.1, fp) * front
    win += (1 - truck) * band(y, lo + 0.3, hi - 0.1, fp) * band(np.abs(x), -1, he[:, 0] - 0.25, fp) * rear
    skirt = band(y, -1, 0.22, fp) * (1 - _face(s, 1))
    alb = _mix(alb, lin((30, 30, 32)), 0.8 * skirt)
    lamp = band(np.abs(x), he[:, 0] - 0.45, he[:, 0] - 0.1, fp) * band(y, 0.35, 0.6, fp) * (front | rear)
    lamp_col = np.where(front[:, None], lin((235, 235, 220)), lin((170, 20, 20)))
    alb = alb + (lamp_col - alb) * lamp[:, None]
    alb = alb + (_glass(s, y - he[:, 1], he[:, 1]) - alb) * np.clip(win, 0, 1)[:, None]
    return alb, lamp_col * (0.15 * lamp)[:, None]


def wheel(s: Surface):
    r = np.maximum(s.params[:, 0], 1e-3)
    rr = np.hypot(s.p[:, 0], s.p[:, 2])
    cap = _face(s, 1)
    rim = band(rr, -1.0, 0.58 * r, s.fpi) * cap
    alb = s.base()
    rim_col = lin(s.style.rim) * (1.0 + 0.1 * s.noise(0.3))[:, None]
    return alb + (rim_col - alb) * rim[:, None], None


_RED, _WHITE, _BLUE, _YELLOW, _BLACK = (
    lin(c) for c in ((200, 28, 30), (238, 238, 236), (20, 70, 170), (240, 196, 20), (25, 25, 25))
)


def sign(s: Surface):
    shape, a, b = s.params[:, 0].astype(int), s.params[:, 1], s.params[:, 2]
    x, z = s.p[:, 0], s.p[:, 2]
    fp = s.fpi
    rr = np.hypot(x, z) / np.maximum(a, 1e-3)
    fpn = fp / np.maximum(a, 1e-3)
    col = np.broadcast_to(_WHITE, s.p.shape).copy()
    # 0 prohibitory: white disc, red ring
    ring = band(rr, 0.72, 2.0, fpn)
    col = np.where((shape == 0)[:, None], _mix(col, _RED, ring), col)
    # 1 mandatory: blue disc with a white arrow
    stem = band(np.abs(x), -1, 0.12 * a, fp) * band(z, -0.55 * a, 0.15 * a, fp)
    head = np.clip(((0.62 * a - z) * 0.9 - np.abs(x)) / np.maximum(fp, 1e-4) + 0.5, 0, 1) * band(
        z, 0.1 * a, 0.62 * a, fp
    )
    arrow = np.clip(stem + head, 0, 1)
    col = np.where((shape == 1)[:, None], _mix(np.broadcast_to(_BLUE, s.p.shape), _WHITE, arrow), col)
    # 2 information: blue rectangle, white border and symbol; 5: white plate, black border
    inner = band(np.abs(x), -1, a - 0.05, fp) * band(np.abs(z), -1, b - 0.05, fp)
    symbol = band(np.abs(x), -1, 0.35 * a, fp) * band(np.abs(z), -1, 0.35 * b, fp)
    info = _mix(_mix(np.broadcast_to(_WHITE, s.p.shape), _BLUE, inner), _WHITE, symbol)
    col = np.where((shape == 2)[:, None], info, col)
    plate = _mix(np.broadcast_to(_BLACK, s.p.shape), _WHITE, inner)
    plate = _mix(
        plate,
        _BLACK,
        0.6
        * inner
        * band(np.abs(z), -1, 0.3 * b, fp)
        * band(np.abs(x), -1, 0.7 * a, fp)
        * (0.5 + 0.5 * pulse(x, 0.09, 0.0, 0.05, fp)),
    )
    col = np.where((shape == 5)[:, None], plate, col)
    # 3 priority road: diamond (the plate is turned 45 degrees), yellow centre, white border
    diamond = _mix(
        np.broadcast_to(_WHITE, s.p.shape),
        _YELLOW,
        band(np.abs(x), -1, 0.68 * a, fp) * band(np.abs(z), -1, 0.68 * a, fp),
    )
    col = np.where((shape == 3)[:, None], diamond, col)
    # 4 no entry: red disc, white bar
    bar = band(np.abs(x), -1, 0.62 * a, fp) * band(np.abs(z), -1, 0.15 * a, fp)
    col = np.where((shape == 4)[:, None], _mix(np.broadcast_to(_RED, s.p.shape), _WHITE, bar), col)
    col = col * (1.0 + 0.05 * s.noise(0.5, 3))[:, None]
    front = _face(s, 1, 1.0)
    return np.where(front[:, None], col, s.base()), None


_LAMPS = lin(((255, 40, 30), (255, 170, 20), (40, 235, 130)))


def light(s: Surface):
    lit = s.params[:, 0].astype(int)
    alb = s.base()
    front = _face(s, 1, 1.0)
    emission = np.zeros_like(alb)
    for k, zc in enumerate((0.3, 0.0, -0.3)):
        lamp = band(np.hypot(s.p[:, 0], s.p[:, 2] - zc), -1, 0.11, s.fpi) * front
        on = lit == k
        col = np.where(on[:, None], _LAMPS[k], _LAMPS[k] * 0.08)
        alb = alb + (col - alb) * lamp[:, None]
        emission += _LAMPS[k] * (1.2 * lamp * on)[:, None]
    return alb, emission


def fence(s: Surface):
    period, gap = s.params[:, 0], s.params[:, 1]
    he = s.size
    q = s.p[:, 2]
    y = s.p[:, 1]
    alb = s.base()
    plank = cell_hash(np.floor(q / period), seed=5) * octave_fade(period, s.fp)
    alb *= (1.0 + 0.15 * plank)[:, None]
    gaps = pulse(q, period, 0.0, gap * period, s.fp) * (1 - _face(s, 1))
    rails = band(np.abs(y - 0.3 * he[:, 1]), -1, 0.06, s.fp) + band(np.abs(y + 0.5 * he[:, 1]), -1, 0.06, s.fp)
    gaps *= 1 - np.clip(rails, 0, 1)
    return alb * (1.0 - 0.7 * gaps)[:, None], None


def wall(s: Surface):
    course, block = s.params[:, 0], s.params[:, 1]
    he = s.size
    y = s.p[:, 1] + he[:, 1]
    q = np.where(he[:, 0] > he[:, 2], s.p[:, 0], s.p[:, 2])
    row = np.floor(y / course)
    q = q + 0.5 * block * (row % 2)
    joints = np.maximum(pulse(y, course, 0.0, 0.03, s.fp), pulse(q, block, 0.0, 0.03, s.fp))
    var = cell_hash(row, np.floor(q / block), seed=17) * octave_fade(np.minimum(course, block), s.fp)
    alb = s.base() * (1.0 + 0.12 * var)[:, None] * (1.0 - 0.3 * joints)[:, None]
    top = _face(s, 1, 1.0)
    return np.where(top[:, None], alb * 1.15, alb), None


PATTERNS: dict[int, Callable[[Surface], tuple]] = {
    M.PLAIN: plain,
    M.ROAD: road,
    M.SIDEWALK: sidewalk,
    M.FACADE: facade,
    M.FOLIAGE: foliage,
    M.GRASS: grass,
    M.VEHICLE: vehicle,
    M.CABIN: cabin,
    M.WHEEL: wheel,
    M.SIGN: sign,
    M.LIGHT: light,
    M.FENCE: fence,
    M.WALL: wall,
    M.BUS: bus,
}


# ---- lighting ----


def _shadow_boxes(scene: Scene, casters: np.ndarray, pts: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """(N,) bool: points whose ray towards the sun hits one of the caster primitives."""
    shadow = np.zeros(len(pts), dtype=bool)
    if len(pts) == 0 or len(casters) == 0:
        return shadow
    # project everything along the sun onto a plane; a caster can only shade points
    # inside its projected bounding rectangle, found by binary search on one axis
    e1 = np.cross(sun, (0.0, 0.0, 1.0) if abs(sun[2]) < 0.9 else (1.0, 0.0, 0.0))
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(sun, e1)
    q1, q2 = pts @ e1, pts @ e2
    order = np.argsort(q1)
    q1s = q1[order]
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    wc = np.einsum("cij,ckj->cki", scene.rot[casters], corners[None] * scene.size[casters][:, None])
    wc += scene.center[casters][:, None]
    c1, c2 = wc @ e1, wc @ e2  # (C,8)
    lo1, hi1 = np.searchsorted(q1s, c1.min(1)), np.searchsorted(q1s, c1.max(1))
    lo2, hi2 = c2.min(1), c2.max(1)
    live = (hi1 > lo1) & (hi2 >= q2.min()) & (lo2 <= q2.max())
    for j in np.nonzero(live)[0]:
        i = casters[j]
        cand = order[lo1[j] : hi1[j]]
        q2c = q2.take(cand)
        cand = cand[(q2c >= lo2[j]) & (q2c <= hi2[j]) & ~shadow.take(cand)]
        if len(cand) == 0:
            continue
        o = (pts.take(cand, axis=0) - scene.center[i]) @ scene.rot[i]  # local origins
        d = scene.rot[i].T @ sun
        if scene.kind[i] == ELLIPSOID:
            r = scene.size[i]
            os_, ds = o / r, d / r
            aa = ds @ ds
            bb = os_ @ ds
            cc = np.einsum("ij,ij->i", os_, os_) - 1.0
            disc = bb * bb - aa * cc
            hit = (disc >= 0) & (-bb + np.sqrt(np.maximum(disc, 0)) > 0)
        else:  # boxes, and cylinders approximated by their bounding boxes
            dd = np.where(np.abs(d) < 1e-12, 1e-12, d)
            t0 = (-scene.size[i] - o) / dd
            t1 = (scene.size[i] - o) / dd
            tnear = np.minimum(t0, t1).max(1)
            tfar = np.maximum(t0, t1).min(1)
            hit = (tfar >= np.maximum(tnear, 0.0)) & (tfar > 1e-4)
        shadow[cand[hit]] = True
    return shadow


def sky_color(dirs: np.ndarray, light: Lighting, fx: float) -> np.ndarray:
    """(N,3) linear sky radiance for unit world directions (gradient, clouds, sun glow)."""
    elev = np.clip(dirs[:, 1], 0.0, 1.0)
    g = np.sqrt(elev)[:, None]
    col = light.horizon * (1 - g) + light.zenith * g
    # clouds on a layer 400 m up; the footprint grows towards the horizon
    lift = np.maximum(dirs[:, 1], 0.0) + 0.06
    q = np.stack([dirs[:, 0] / lift, dirs[:, 2] / lift, np.zeros_like(lift)], 1) * 400.0
    fp = 400.0 / (fx * lift * lift)
    n = fbm(q, fp.astype(np.float32), 260.0, octaves=5, offset=light.cloud_offset)
    cover = np.clip((0.5 + 0.5 * n - (1.0 - light.clouds)) / 0.35 + 0.5, 0, 1) * light.clouds
    cloud_col = light.horizon * 1.05 * (0.85 + 0.25 * n)[:, None]
    col = col + (cloud_col - col) * cover[:, None]
    glow = np.maximum(dirs @ light.sun_dir, 0.0) ** 48 * 0.5 * (1 - cover)
    return (col + glow[:, None] * light.sun / max(float(light.sun.max()), 1e-3)).astype(np.float32)


def shade(scene: Scene, tr: Trace, cam: Camera, light: Lighting, style: Style) -> np.ndarray:
    """Linear RGB of traced rays, shaped like ``tr.pid`` plus a colour axis (e.g. (H,W,3))."""
    shape = tr.pid.shape
    pid = tr.pid.reshape(-1)
    rays = tr.rays.reshape(-1, 3)
    ray_len = np.linalg.norm(rays, axis=1)
    dirs = rays / ray_len[:, None]
    out = np.zeros((len(pid), 3), dtype=np.float32)
    fx = float(cam.K[0, 0])
    sky = pid < 0
    if sky.any():
        out[sky] = sky_color(dirs[sky], light, fx)
    hit = np.nonzero(~sky)[0]
    if len(hit) == 0:
        return out.reshape(*shape, 3)
    # Gathers use ``take`` rather than fancy indexing: the same values, several times faster,
    # and gathering per-primitive attributes for every pixel is a good part of the shading time.
    hp = pid.take(hit)
    depth = tr.depth.reshape(-1).take(hit)
    dist = depth * ray_len.take(hit)
    n_local = tr.n_local.reshape(-1, 3).take(hit, axis=0)
    n_world = np.einsum("nij,nj->ni", scene.rot.take(hp, axis=0), n_local)
    dirs_hit = dirs.take(hit, axis=0)
    cos = np.abs(np.einsum("ij,ij->i", n_world, dirs_hit))
    fpi = (dist / fx).astype(np.float32)
    fp = (fpi / np.maximum(cos, 1.0 / MAX_ANISOTROPY)).astype(np.float32)
    p_local = tr.p_local.reshape(-1, 3).take(hit, axis=0).astype(np.float32)

    albedo = np.zeros((len(hit), 3), dtype=np.float32)
    emission = np.zeros((len(hit), 3), dtype=np.float32)
    pat = scene.pattern.take(hp)
    for k in np.unique(pat):
        sel = np.nonzero(pat == k)[0]
        ids = hp.take(sel)
        surf = Surface(
            p=p_local.take(sel, axis=0),
            n=n_local.take(sel, axis=0).astype(np.float32),
            fp=fp.take(sel),
            fpi=fpi.take(sel),
            color=scene.color.take(ids, axis=0),
            amp=scene.amp.take(ids),
            wl=scene.wavelength.take(ids),
            params=scene.params.take(ids, axis=0),
            offset=scene.offset.take(ids, axis=0),
            size=scene.size.take(ids, axis=0).astype(np.float32),
            road=scene.road,
            style=style,
        )
        a, e = PATTERNS[int(k)](surf)
        albedo[sel] = np.clip(a, 0.0, 1.0)
        if e is not None:
            emission[sel] = e

    pts = cam.position + dist[:, None] * dirs_hit
    ndl = n_world @ light.sun_dir
    lit = ndl > 0
    casters = np.nonzero(scene.caster)[0]
    casters = casters[casters != GROUND]
    shadow = np.zeros(len(hit), dtype=bool)
    idx = np.nonzero(lit)[0]
    shadow[idx] = _shadow_boxes(scene, casters, pts.take(idx, axis=0) + 0.02 * n_world.take(idx, axis=0), light.sun_dir)
    direct = np.where(shadow, 0.0, np.maximum(ndl, 0.0)).astype(np.float32)
    skyw = (0.55 + 0.45 * (0.5 + 0.5 * n_world[:, 1])).astype(np.float32)
    radiance = albedo * (light.sun * direct[:, None] + light.sky_light * skyw[:, None]) + emission
    haze = (1.0 - np.exp(-dist / light.haze)).astype(np.float32)
    out[hit] = radiance + (light.horizon - radiance) * haze[:, None]
    return out.reshape(*shape, 3)


def tone_map(rgb: np.ndarray, light: Lighting, style: Style) -> np.ndarray:
    """Linear RGB -> uint8 sRGB with the style's exposure, contrast and saturation."""
    x = np.clip(rgb * light.exposure, 0.0, None)
    x = x / (1.0 + 0.12 * x)  # gentle highlight roll-off
    x = np.clip(x, 0.0, 1.0) ** (1 / 2.2)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * style.saturation
    x = 0.5 + (x - 0.5) * style.contrast
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
