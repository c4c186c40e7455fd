"""One random street as analytic primitives.

World frame: X to the right, Y up, Z along the street; the road surface is Y = 0 and
the road centre line is X = 0. Traffic keeps right, so the ego camera drives in a
lane at X > 0 towards +Z, starting (frame t) at Z = 0.

The street is built side by side (side = -1 left, +1 right) from a few sampled
dimensions: road half width (parking + travel lanes), raised sidewalks with kerbs,
a terrain slab behind them, and a sequence of *lots* along each side (buildings with
varied setbacks / heights / lengths, or gaps holding walls, fences, hedges, trees
and lawns). Street furniture (lamps, sign poles, traffic lights, tree rows), parked
and moving vehicles and people are placed on top. An optional intersection or
zebra crossing concentrates traffic lights and pedestrians. A per-sample
"urbanity" value shifts the mix between dense blocks and leafy suburbs, so class
statistics vary from image to image like in real data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from data_prep.synth import materials as M
from data_prep.synth.geometry import BOX, CYLINDER, ELLIPSOID, Scene
from data_prep.synth.styles import RGB, Style

FPS = 17.0  # frame rate the motions are scaled to (Cityscapes sequences: ~17 Hz)
Z_MIN, Z_MAX = -15.0, 420.0  # extent of the street along Z
X_FAR = 70.0  # lateral extent of the terrain behind the lots
KERB_WIDTH = 0.25  # kerb stones between road and a grass verge
CAR_RANGE = 130.0  # vehicles up to this distance

# class ids (Cityscapes train ids); the canonical names live in sdeseg.data.classes
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN = range(10)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
THINGS = frozenset(range(PERSON, BICYCLE + 1))  # classes whose objects are instances


def yaw(a: float) -> np.ndarray:
    """Rotation about world Y by ``a`` radians (local +Z turns towards +X for a > 0)."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def pitch(a: float) -> np.ndarray:
    """Rotation about the local X axis by ``a`` radians (local +Z tilts up for a > 0)."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def frame_from_axes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Right-handed rotation whose local X and Y axes point along ``x`` and ``y`` (columns)."""
    x = np.asarray(x, float) / np.linalg.norm(x)
    y = np.asarray(y, float) / np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)], axis=1)


AXLE = frame_from_axes((0.0, -1.0, 0.0), (1.0, 0.0, 0.0))  # cylinder axis along local X (wheels)


def facing(direction: np.ndarray) -> np.ndarray:
    """Plate frame: local X lateral, local Y = the way the plate faces, local Z = up."""
    d = np.asarray(direction, float)
    return frame_from_axes(np.cross(d, (0.0, 1.0, 0.0)), d)


def srgb_to_linear(c) -> np.ndarray:
    """sRGB 0..255 -> linear 0..1."""
    return (np.asarray(c, dtype=np.float64) / 255.0) ** 2.2


def one_object(method):
    """Decorator: every primitive a composite adds (a car's body, cabin and wheels) is one object.

    A composite called inside another (the rider of a bicycle) is an object of its own, as in
    Cityscapes, where a rider and their bicycle are two instances.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.new_object():
            return method(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Ego:
    """Ego-motion of the camera around frame t (world units)."""

    x: float  # lateral position at frame t
    heading: float  # yaw at frame t (radians)
    step: float  # metres per frame
    yaw_rate: float  # radians per frame


class SceneBuilder:
    """Accumulates primitives; :meth:`build` turns them into a :class:`Scene`."""

    def __init__(self, rng: np.random.Generator, style: Style):
        self.rng = rng
        self.style = style
        self.rows: list[dict] = []
        self.objects = 0  # objects (instances) so far; ids start at 1
        self._object = 0  # the object primitives of a thing class join now (0: none open)

    @contextmanager
    def new_object(self) -> Iterator[int]:
        """Primitives of thing classes added inside the block belong to one new object.

        Object ids only number instances; they draw nothing from ``rng``, so opening objects
        leaves every sampled value (and so every rendered pixel) as it was.
        """
        outer = self._object
        self.objects += 1
        self._object = self.objects
        try:
            yield self._object
        finally:
            self._object = outer

    def color(self, palette: tuple[RGB, ...] | RGB, jitter: float = 0.06) -> np.ndarray:
        """One palette entry with a small per-object brightness / hue jitter (sRGB 0..255)."""
        pal = np.asarray(palette, dtype=np.float64).reshape(-1, 3)
        c = pal[self.rng.integers(len(pal))]
        c = c * (1.0 + jitter * self.rng.normal()) * (1.0 + 0.5 * jitter * self.rng.normal(size=3))
        return np.clip(c, 0, 255)

    def add(
        self,
        kind: int,
        center,
        size,
        cls: int,
        color,
        *,
        rot: np.ndarray | None = None,
        pattern: int = M.PLAIN,
        wavelength: float = 1.0,
        amp: float = 0.1,
        params=(),
        velocity=(0.0, 0.0, 0.0),
        caster: bool = False,
    ) -> int:
        """Add one primitive (see :class:`Scene` for the meaning of the fields); returns its index."""
        moving = bool(np.any(np.asarray(velocity) != 0))
        instance = 0
        if cls in THINGS:
            if not self._object:  # a lone thing primitive is an object by itself
                self.objects += 1
            instance = self._object or self.objects
        p = np.zeros(M.NUM_PARAMS)
        p[: len(params)] = params
        self.rows.append(
            dict(
                kind=kind,
                center=np.asarray(center, float),
                rot=np.eye(3) if rot is None else np.asarray(rot, float),
                size=np.asarray(size, float),
                velocity=np.asarray(velocity, float),
                cls=cls,
                moving=moving,
                instance=instance,
                caster=caster and not moving,
                color=srgb_to_linear(color),
                pattern=pattern,
                wavelength=wavelength * self.style.texture_scale,
                amp=amp * self.style.texture_amp,
                params=p,
                offset=self.rng.uniform(-500, 500, size=3),
            )
        )
        return len(self.rows) - 1

    def box_between(self, lo, hi, cls: int, color, **kw) -> int:
        """Axis-aligned box from corner ``lo`` to corner ``hi`` (any order)."""
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        return self.add(BOX, (lo + hi) / 2, (hi - lo) / 2, cls, color, **kw)

    def build(self, road: dict) -> Scene:
        """Freeze the primitives into a struct-of-arrays scene."""

        def col(name, dtype):
            return np.array([r[name] for r in self.rows], dtype=dtype)

        return Scene(
            kind=col("kind", np.int8),
            center=col("center", np.float64),
            rot=col("rot", np.float64),
            size=col("size", np.float64),
            velocity=col("velocity", np.float64),
            cls=col("cls", np.uint8),
            moving=col("moving", bool),
            instance=col("instance", np.int32),
            caster=col("caster", bool),
            color=col("color", np.float32),
            pattern=col("pattern", np.int16),
            wavelength=col("wavelength", np.float32),
            amp=col("amp", np.float32),
            params=col("params", np.float32),
            offset=col("offset", np.float32),
            road=road,
        )

    # ---- composite objects (group origin on the ground, local +Z = forward) ----

    def part(self, kind, origin, heading, offset, size, cls, color, *, rot=None, velocity=(0, 0, 0), **kw):
        """Add a part of a rigid group placed at ``origin`` with yaw ``heading``."""
        r = yaw(heading)
        center = np.asarray(origin, float) + r @ np.asarray(offset, float)
        return self.add(kind, center, size, cls, color, rot=r if rot is None else r @ rot, velocity=velocity, **kw)

    @one_object
    def car(self, x, z, heading, velocity=(0, 0, 0), kind="car"):
        """A car (or a van when ``kind == 'van'``): body, greenhouse and two axles."""
        rng, st = self.rng, self.style
        van = kind == "van"
        length = rng.uniform(4.6, 5.4) if van else rng.uniform(3.7, 4.9)
        width = rng.uniform(1.9, 2.05) if van else rng.uniform(1.68, 1.88)
        clear = 0.2
        hb = rng.uniform(0.62, 0.78) if not van else rng.uniform(1.0, 1.2)
        hc = rng.uniform(0.45, 0.58) if not van else rng.uniform(0.65, 0.8)
        lc = length * (rng.uniform(0.45, 0.58) if not van else 0.78)
        paint = self.color(st.car_paint if not van else st.truck_paint, 0.04)
        o = (x, 0.0, z)
        cls = CAR  # Cityscapes counts vans with a continuous body as cars
        self.part(
            BOX,
            o,
            heading,
            (0, clear + hb / 2, 0),
            (width / 2, hb / 2, length / 2),
            cls,
            paint,
            pattern=M.VEHICLE,
            wavelength=2.0,
            amp=0.06,
            params=(hb, length, width),
            velocity=velocity,
            caster=True,
        )
        cab_z = -0.08 * length if not van else -0.05 * length
        self.part(
            BOX,
            o,
            heading,
            (0, clear + hb + hc / 2, cab_z),
            (width * 0.45, hc / 2, lc / 2),
            cls,
            paint,
            pattern=M.CABIN,
            wavelength=2.0,
            amp=0.06,
            params=(hc, lc, 1.0 if van else 0.0),
            velocity=velocity,
            caster=True,
        )
        radius = rng.uniform(0.3, 0.34)
        self.wheels(o, heading, cls, radius, width / 2 + 0.015, (-0.34 * length, 0.33 * length), velocity)
        return length

    def wheels(self, o, heading, cls, radius, half_width, positions, velocity, wavelength=0.5):
        """Tyres: one cylinder on a transverse axle at each position along the vehicle's length."""
        for az in positions:
            self.part(CYLINDER, o, heading, (0, radius, az), (radius, half_width, radius), cls, self.style.tyre,
                      rot=AXLE, pattern=M.WHEEL, wavelength=wavelength, amp=0.05, params=(radius,),
                      velocity=velocity)

    @one_object
    def truck(self, x, z, heading, velocity=(0, 0, 0)):
        """A box truck: cab, cargo box and three axles."""
        rng, st = self.rng, self.style
        width = 2.45
        cab_l, box_l = rng.uniform(1.8, 2.3), rng.uniform(5.0, 7.5)
        length = cab_l + box_l + 0.2
        cab_h, box_h = rng.uniform(2.5, 2.9), rng.uniform(3.2, 3.8)
        paint = self.color(st.truck_paint, 0.05)
        cargo = self.color(st.truck_paint + st.facade[:3], 0.05)
        o = (x, 0.0, z)
        zf = length / 2
        self.part(
            BOX,
            o,
            heading,
            (0, 0.45 + cab_h / 2, zf - cab_l / 2),
            (width / 2, cab_h / 2, cab_l / 2),
            TRUCK,
            paint,
            pattern=M.BUS,
            wavelength=1.5,
            amp=0.04,
            params=(cab_h * 0.45, cab_h * 0.95, 0.0, 1.0),
            velocity=velocity,
            caster=True,
        )
        self.part(
            BOX,
            o,
            heading,
            (0, 0.55 + box_h / 2, zf - cab_l - 0.2 - box_l / 2),
            (width / 2 + 0.03, box_h / 2, box_l / 2),
            TRUCK,
            cargo,
            pattern=M.PLAIN,
            wavelength=3.0,
            amp=0.08,
            velocity=velocity,
            caster=True,
        )
        radius = 0.5
        axles = (zf - cab_l / 2, -length / 2 + 1.6, -length / 2 + 2.8)
        self.wheels(o, heading, TRUCK, radius, width / 2 + 0.02, axles, velocity)
        return length

    @one_object
    def bus(self, x, z, heading, velocity=(0, 0, 0), tram=False):
        """A city bus (or a tram: longer, labelled train, no visible wheels)."""
        rng, st = self.rng, self.style
        width = 2.55 if not tram else 2.4
        length = rng.uniform(11.0, 13.0) if not tram else rng.uniform(24.0, 32.0)
        height = rng.uniform(2.9, 3.2) if not tram else rng.uniform(3.2, 3.5)
        clear = 0.3 if not tram else 0.35
        cls = BUS if not tram else TRAIN
        paint = self.color(st.bus_paint if not tram else st.tram_paint, 0.04)
        o = (x, 0.0, z)
        self.part(
            BOX,
            o,
            heading,
            (0, clear + height / 2, 0),
            (width / 2, height / 2, length / 2),
            cls,
            paint,
            pattern=M.BUS,
            wavelength=2.0,
            amp=0.04,
            params=(height * 0.38, height * 0.88, 1.35, 0.0),
            velocity=velocity,
            caster=True,
        )
        if not tram:
            radius = 0.5
            self.wheels(o, heading, cls, radius, width / 2 + 0.02, (length / 2 - 2.6, -length / 2 + 3.2), velocity)
        return length

    @one_object
    def person(self, x, z, heading, velocity=(0, 0, 0), cls=PERSON, seated=False, y0=0.0):
        """A pedestrian (legs, torso, arms, head), or a seated rider when ``seated``."""
        rng, st = self.rng, self.style
        s = rng.uniform(1.55, 1.95) / 1.75
        pants, shirt, skin = self.color(st.clothes), self.color(st.clothes), self.color(st.skin, 0.03)
        sleeves = skin if rng.random() < 0.3 else shirt
        o = (x, y0, z)
        kw = dict(velocity=velocity, wavelength=0.4, amp=0.08)
        if not seated:
            stride = rng.uniform(-0.12, 0.12) if np.any(np.asarray(velocity) != 0) else 0.0
            for side, dz in ((-1, stride), (1, -stride)):
                self.part(
                    BOX,
                    o,
                    heading,
                    (side * 0.1 * s, 0.43 * s, dz * s),
                    (0.075 * s, 0.43 * s, 0.085 * s),
                    cls,
                    pants,
                    **kw,
                )
            torso_c, lean, arm_lean = (0.0, 1.2 * s, 0.0), 0.0, 0.0
        else:
            for side in (-1, 1):
                self.part(
                    BOX,
                    o,
                    heading,
                    (side * 0.12 * s, 0.62 * s, 0.1 * s),
                    (0.07 * s, 0.36 * s, 0.09 * s),
                    cls,
                    pants,
                    rot=pitch(0.3),
                    **kw,
                )
            torso_c, lean, arm_lean = (0.0, 1.22 * s, 0.12 * s), 0.45, 0.9
        self.part(ELLIPSOID, o, heading, torso_c, (0.2 * s, 0.33 * s, 0.13 * s), cls, shirt, rot=pitch(lean), **kw)
        for side in (-1, 1):
            arm_c = (side * 0.25 * s, torso_c[1] - 0.02 * s, torso_c[2] + 0.12 * s * arm_lean)
            self.part(
                ELLIPSOID,
                o,
                heading,
                arm_c,
                (0.06 * s, 0.3 * s, 0.06 * s),
                cls,
                sleeves,
                rot=pitch(arm_lean),
                **kw,
            )
        head = (0.0, torso_c[1] + 0.43 * s, torso_c[2] + 0.2 * s * lean)
        self.part(ELLIPSOID, o, heading, head, (0.095 * s, 0.12 * s, 0.105 * s), cls, skin, **kw)

    @one_object
    def bicycle(self, x, z, heading, velocity=(0, 0, 0), rider=False):
        """A bicycle (two thin wheels, frame, handlebar), optionally with a rider."""
        st = self.style
        o = (x, 0.0, z)
        frame = self.color(st.car_paint + st.clothes, 0.05)
        kw = dict(velocity=velocity)
        radius = 0.34
        self.wheels(o, heading, BICYCLE, radius, 0.03, (-0.52, 0.52), kw["velocity"], wavelength=0.3)
        self.part(BOX, o, heading, (0, 0.62, 0.0), (0.03, 0.2, 0.42), BICYCLE, frame, wavelength=0.3, amp=0.05, **kw)
        self.part(BOX, o, heading, (0, 1.0, 0.45), (0.3, 0.025, 0.025), BICYCLE, st.pole[1], **kw)
        if rider:
            self.person(x, z, heading, velocity=velocity, cls=RIDER, seated=True, y0=0.0)

    @one_object
    def motorcycle(self, x, z, heading, velocity=(0, 0, 0)):
        """A parked motorcycle: two wheels, body and seat."""
        st = self.style
        o = (x, 0.0, z)
        paint = self.color(st.car_paint, 0.05)
        radius = 0.31
        self.wheels(o, heading, MOTORCYCLE, radius, 0.07, (-0.72, 0.72), velocity, wavelength=0.3)
        self.part(
            BOX,
            o,
            heading,
            (0, 0.62, 0.05),
            (0.17, 0.22, 0.55),
            MOTORCYCLE,
            paint,
            wavelength=0.5,
            amp=0.05,
            velocity=velocity,
        )
        self.part(BOX, o, heading, (0, 0.9, -0.25), (0.15, 0.06, 0.35), MOTORCYCLE, (30, 30, 30), velocity=velocity)
        self.part(BOX, o, heading, (0, 1.05, 0.62), (0.35, 0.025, 0.025), MOTORCYCLE, st.pole[1], velocity=velocity)

    def tree(self, x, z, scale=1.0):
        """A tree: trunk cylinder and an ellipsoidal crown (both vegetation)."""
        rng, st = self.rng, self.style
        trunk_h = rng.uniform(2.0, 3.6) * scale
        r = rng.uniform(0.12, 0.24) * scale
        crown = np.array([rng.uniform(1.4, 3.0), rng.uniform(1.6, 3.4), 0.0]) * scale
        crown[2] = crown[0] * rng.uniform(0.85, 1.15)
        # the crown (centred 0.75 of its height above the trunk) clears 2.3 m: cameras and
        # cars pass underneath street trees
        trunk_h = max(trunk_h, 2.3 + 0.25 * crown[1])
        self.add(
            CYLINDER,
            (x, trunk_h / 2 + 0.4, z),
            (r, trunk_h / 2 + 0.4, r),
            VEGETATION,
            self.color(st.bark),
            wavelength=0.4,
            amp=0.15,
            caster=True,
        )
        self.add(
            ELLIPSOID,
            (x, trunk_h + crown[1] * 0.75, z),
            crown,
            VEGETATION,
            self.color(st.foliage),
            pattern=M.FOLIAGE,
            wavelength=1.2,
            amp=0.5,
            params=tuple(self.color(st.foliage_light)),
            caster=True,
        )

    def pole(self, x, z, height, radius, color=None) -> None:
        """A vertical pole standing on the sidewalk."""
        c = self.color(self.style.pole) if color is None else color
        self.add(
            CYLINDER,
            (x, height / 2 + 0.1, z),
            (radius, height / 2, radius),
            POLE,
            c,
            wavelength=0.3,
            amp=0.06,
            caster=True,
        )

    def sign(self, x, y, z, face: np.ndarray, shape: int) -> None:
        """A traffic sign centred at (x, y, z) facing ``face`` (shape codes: see shading.SIGN)."""
        rng = self.rng
        rot = facing(face)
        back = self.style.pole[0]
        if shape in (0, 1, 4):  # round: thin disc, axis = facing direction
            r = rng.uniform(0.3, 0.4)
            self.add(
                CYLINDER,
                (x, y, z),
                (r, 0.02, r),
                SIGN,
                back,
                rot=rot,
                pattern=M.SIGN,
                params=(shape, r, r),
                amp=0.03,
            )
        elif shape == 3:  # diamond: a square plate turned 45 degrees about the facing axis
            a = rng.uniform(0.25, 0.32)
            turn = np.array(
                [
                    [math.cos(math.pi / 4), 0, -math.sin(math.pi / 4)],
                    [0, 1, 0],
                    [math.sin(math.pi / 4), 0, math.cos(math.pi / 4)],
                ]
            )
            self.add(
                BOX,
                (x, y, z),
                (a, 0.02, a),
                SIGN,
                back,
                rot=rot @ turn,
                pattern=M.SIGN,
                params=(shape, a, a),
                amp=0.03,
            )
        else:  # rectangles: info (2) or street-name style (5)
            hx, hz = rng.uniform(0.3, 0.55), rng.uniform(0.22, 0.4)
            if shape == 5:
                hz = rng.uniform(0.12, 0.18)
            self.add(
                BOX,
                (x, y, z),
                (hx, 0.02, hz),
                SIGN,
                back,
                rot=rot,
                pattern=M.SIGN,
                params=(shape, hx, hz),
                amp=0.03,
            )

    def traffic_light(self, x, y, z, face: np.ndarray, lit: int) -> None:
        """A three-lamp traffic-light housing centred at (x, y, z) facing ``face``."""
        housing = self.color(((40, 42, 40), (50, 52, 44), (30, 30, 32)), 0.05)
        self.add(
            BOX,
            (x, y, z),
            (0.17, 0.13, 0.48),
            LIGHT,
            housing,
            rot=facing(face),
            pattern=M.LIGHT,
            params=(lit,),
            amp=0.04,
            caster=True,
        )


# ---------------------------------------------------------------------------------------------
# street layout


def sample_road(rng: np.random.Generator) -> dict:
    """Road cross-section and the positions of intersection / zebra crossing."""
    lanes = int(rng.choice([1, 1, 1, 2]))
    lane_w = rng.uniform(2.9, 3.5)
    parking = 2.2 if rng.random() < 0.75 else 0.0
    rw = parking + lanes * lane_w
    road = dict(
        lanes=lanes,
        lane_width=lane_w,
        parking=parking,
        half_width=rw,
        kerb=rng.uniform(0.1, 0.17),
        sidewalk=(rng.uniform(2.2, 5.5), rng.uniform(2.2, 5.5)),  # left, right; verge included
        urbanity=rng.uniform(0.0, 1.0),
        parking_line=bool(rng.random() < 0.5),
        solid_centre=bool(lanes > 1 or rng.random() < 0.25),
        intersection=None,
        crossing=None,
        tram=None,
        end=None,
    )
    road["verge"] = tuple(
        rng.uniform(0.8, min(2.2, w - 1.6)) if w > 2.6 and rng.random() < 0.35 else 0.0 for w in road["sidewalk"]
    )
    if rng.random() < 0.5:
        z0 = rng.uniform(14.0, 70.0)
        road["intersection"] = (
            z0,
            z0 + rng.uniform(9.0, 16.0),
            rng.uniform(2.0, 4.0),
        )  # z0, z1, sidewalk width
        road["crossing"] = (z0 - 4.5, z0 - 1.0)
    elif rng.random() < 0.5:
        z0 = rng.uniform(10.0, 55.0)
        road["crossing"] = (z0, z0 + rng.uniform(3.0, 4.5))
    if rng.random() < 0.45:
        road["end"] = rng.uniform(110.0, 320.0)
    return road


def sample_ego(rng: np.random.Generator, road: dict) -> Ego:
    """Camera lane, heading relative to the street and per-frame motion."""
    lane = int(rng.integers(road["lanes"]))
    x = (lane + 0.5) * road["lane_width"] + rng.uniform(-0.35, 0.35)
    heading = math.radians(float(np.clip(rng.normal(0.0, 2.5), -7.0, 7.0)))
    step = rng.uniform(0.4, 1.5)
    yaw_rate = math.radians(rng.uniform(-1.8, 1.8))
    return Ego(x=x, heading=heading, step=step, yaw_rate=yaw_rate)


def _blocked(z0: float, z1: float, zones: list[tuple[float, float]]) -> bool:
    return any(z1 > a and z0 < b for a, b in zones)


def generate_street(rng: np.random.Generator, style: Style) -> tuple[Scene, Ego]:
    """Sample a full street scene and the ego-motion through it."""
    road = sample_road(rng)
    ego = sample_ego(rng, road)
    b = SceneBuilder(rng, style)
    st = style
    rw, kh = road["half_width"], road["kerb"]
    urb = road["urbanity"]

    # 0: the ground plane (its pattern draws the road; colour = asphalt)
    b.add(BOX, (0, 0, 0), (0, 0, 0), ROAD, b.color(st.asphalt, 0.05), pattern=M.ROAD, wavelength=2.5, amp=0.4)
    road["marking"] = list(b.color(st.marking, 0.03))

    inter = road["intersection"]
    z_end = road["end"] if road["end"] is not None else Z_MAX
    # zones along Z where the side strips are interrupted by the cross street
    cross = [] if inter is None else [(inter[0], inter[1])]
    corner = [] if inter is None else [(inter[0] - inter[2], inter[1] + inter[2])]

    def z_segments(zones):
        segs, z = [], Z_MIN
        for a, c in sorted(zones):
            segs.append((z, a))
            z = c
        segs.append((z, z_end))
        return [(a, c) for a, c in segs if c - a > 0.1]

    sidewalk_color = b.color(st.sidewalk, 0.04)
    kerb_color = b.color(st.kerb, 0.03)
    tile = rng.uniform(0.3, 0.7)
    lot_lines = {}
    for side in (-1, 1):
        sw = road["sidewalk"][0 if side < 0 else 1]
        verge = road["verge"][0 if side < 0 else 1]
        inner, outer = side * rw, side * (rw + sw)
        grass = b.color(st.grass, 0.05)
        for za, zb in z_segments(cross):
            if verge > 0:  # kerb stones, a grass verge, then the footway
                kerb_edge = side * (rw + KERB_WIDTH)
                walk_edge = side * (rw + KERB_WIDTH + verge)
                b.box_between(
                    (inner, 0, za),
                    (kerb_edge, kh, zb),
                    SIDEWALK,
                    sidewalk_color,
                    pattern=M.SIDEWALK,
                    wavelength=2.0,
                    amp=0.2,
                    params=(*kerb_color, tile, side),
                )
                b.box_between(
                    (kerb_edge, 0, za),
                    (walk_edge, kh + 0.02, zb),
                    TERRAIN,
                    grass,
                    pattern=M.GRASS,
                    wavelength=4.0,
                    amp=0.35,
                    params=tuple(b.color(st.soil)),
                )
                b.box_between(
                    (walk_edge, 0, za),
                    (outer, kh, zb),
                    SIDEWALK,
                    sidewalk_color,
                    pattern=M.SIDEWALK,
                    wavelength=2.0,
                    amp=0.2,
                    params=(*kerb_color, tile, 0.0),
                )
            else:
                b.box_between(
                    (inner, 0, za),
                    (outer, kh, zb),
                    SIDEWALK,
                    sidewalk_color,
                    pattern=M.SIDEWALK,
                    wavelength=2.0,
                    amp=0.2,
                    params=(*kerb_color, tile, side),
                )
        for za, zb in z_segments(corner):
            b.box_between(
                (outer, 0, za),
                (side * X_FAR, kh, zb),
                TERRAIN,
                grass,
                pattern=M.GRASS,
                wavelength=4.0,
                amp=0.35,
                params=tuple(b.color(st.soil)),
            )
        if inter is not None:  # corner sidewalks along the cross street
            for za, zb in ((inter[0] - inter[2], inter[0]), (inter[1], inter[1] + inter[2])):
                b.box_between(
                    (outer, 0, za),
                    (side * X_FAR, kh, zb),
                    SIDEWALK,
                    sidewalk_color,
                    pattern=M.SIDEWALK,
                    wavelength=2.0,
                    amp=0.2,
                    params=(*kerb_color, tile, 0.0),
                )
        lot_lines[side] = rw + sw

    # ---- lots: buildings and gaps ----
    for side in (-1, 1):
        front = lot_lines[side]
        z = Z_MIN - rng.uniform(0, 10)
        while z < z_end:
            if _blocked(z, z + 1.0, corner):
                z = corner[0][1]
                continue
            if rng.random() < 0.45 + 0.5 * urb:
                length = rng.uniform(7.0, 28.0)
                z1 = min(z + length, z_end)
                if corner and z < corner[0][0] < z1:
                    z1 = corner[0][0]
                setback = 0.0 if rng.random() < 0.35 + 0.6 * urb else rng.uniform(1.5, 7.0)
                add_building(b, side, front + setback, z, z1, rng.uniform(10.0, 18.0), urb)
                if setback > 0 and rng.random() < 0.6:
                    add_boundary(b, side, front + 0.15, z, z1, kh)
                z = z1 + (rng.uniform(0.0, 0.4) if rng.random() < 0.7 else rng.uniform(1.0, 4.0))
            else:
                length = rng.uniform(4.0, 20.0)
                z1 = min(z + length, z_end)
                if corner and z < corner[0][0] < z1:
                    z1 = corner[0][0]
                add_boundary(b, side, front + 0.15, z, z1, kh)
                for _ in range(rng.poisson(1.2)):
                    tz = rng.uniform(z, z1)
                    b.tree(side * (front + rng.uniform(2.5, 9.0)), tz, scale=rng.uniform(0.9, 1.5))
                if rng.random() < 0.7:
                    back = front + rng.uniform(12.0, 30.0)
                    add_building(
                        b,
                        side,
                        back,
                        z - rng.uniform(0, 3),
                        z1 + rng.uniform(0, 3),
                        rng.uniform(10.0, 18.0),
                        urb,
                    )
                z = z1
    if road["end"] is not None:  # a facade closing the street
        e = road["end"]
        add_facing_building(b, -X_FAR, X_FAR, e, e + 15.0, urb)
    else:  # distant skyline beyond the lots so the vanishing point is not a hole to the horizon
        for _ in range(8):
            x0 = rng.uniform(-60, 60)
            zb = rng.uniform(Z_MAX, Z_MAX + 200)
            add_facing_building(b, x0 - rng.uniform(10, 30), x0 + rng.uniform(10, 30), zb, zb + 20, urb)

    if inter is not None:
        add_intersection(b, road)
    add_furniture(b, road)
    add_vehicles(b, road, ego)
    add_people(b, road, ego)
    return b.build(road), ego


def add_building(b: SceneBuilder, side: int, x_front: float, z0: float, z1: float, depth: float, urb: float):
    """A building block with its facade at |X| = x_front, spanning z0..z1."""
    rng, st = b.rng, b.style
    floor_h = rng.uniform(2.9, 3.6)
    floors = int(rng.integers(2, 4 + int(5 * urb) + 1))
    height = floors * floor_h + rng.uniform(0.3, 2.0)
    shop = 1.0 if rng.random() < 0.2 + 0.5 * urb else 0.0
    windows = 1.0 if rng.random() < 0.93 else 0.0
    params = (
        floor_h,
        rng.uniform(1.8, 3.4),  # window period along the facade
        rng.uniform(0.35, 0.6),  # window width fraction
        rng.uniform(0.4, 0.62),  # window height fraction
        shop,
        windows,
        *b.color(st.roof),
        *b.color(st.glass, 0.08),
    )
    facade = b.color(st.facade)
    wavelength, amp = rng.uniform(1.5, 4.0), rng.uniform(0.12, 0.3)
    b.box_between(
        (side * x_front, 0, z0),
        (side * (x_front + depth), height, z1),
        BUILDING,
        facade,
        pattern=M.FACADE,
        wavelength=wavelength,
        amp=amp,
        params=params,
        caster=True,
    )
    if floors >= 3 and z1 - z0 > 8.0 and rng.random() < 0.3:  # a set-back top storey
        inset = rng.uniform(1.2, 3.0)
        top = floor_h * rng.integers(1, 3)
        b.box_between(
            (side * (x_front + inset), height - 0.05, z0 + rng.uniform(0.0, 2.0)),
            (side * (x_front + depth), height + top, z1 - rng.uniform(0.0, 2.0)),
            BUILDING,
            facade * 0.92,
            pattern=M.FACADE,
            wavelength=wavelength,
            amp=amp,
            params=(floor_h, params[1], params[2], params[3], 0.0, *params[5:]),
            caster=True,
        )


def add_facing_building(b: SceneBuilder, x0: float, x1: float, z0: float, z1: float, urb: float):
    """A building whose facade faces the camera (-Z), e.g. the end of the street."""
    rng, st = b.rng, b.style
    floor_h = rng.uniform(2.9, 3.6)
    height = int(rng.integers(3, 9)) * floor_h + rng.uniform(0.3, 2)
    params = (
        floor_h,
        rng.uniform(1.8, 3.2),
        0.5,
        0.5,
        1.0 if rng.random() < 0.5 else 0.0,
        1.0,
        *b.color(st.roof),
        *b.color(st.glass, 0.08),
    )
    b.box_between(
        (x0, 0, z0),
        (x1, height, z1),
        BUILDING,
        b.color(st.facade),
        pattern=M.FACADE,
        wavelength=3.0,
        amp=0.2,
        params=params,
        caster=True,
    )


def add_boundary(b: SceneBuilder, side: int, x: float, z0: float, z1: float, kh: float):
    """What separates the sidewalk from a lawn: a fence, a wall, a hedge or nothing."""
    rng, st = b.rng, b.style
    kind = rng.choice(["fence", "wall", "hedge", "none"], p=[0.35, 0.27, 0.23, 0.15])
    if kind == "fence":
        h = rng.uniform(0.9, 2.0)
        b.box_between(
            (side * (x - 0.03), kh, z0),
            (side * (x + 0.03), kh + h, z1),
            FENCE,
            b.color(st.fence),
            pattern=M.FENCE,
            wavelength=1.0,
            amp=0.1,
            params=(rng.uniform(0.12, 0.3), rng.uniform(0.15, 0.45), 2.0),
            caster=True,
        )
    elif kind == "wall":
        h = rng.uniform(0.6, 2.4)
        t = rng.uniform(0.12, 0.3)
        b.box_between(
            (side * x, 0, z0),
            (side * (x + 2 * t), kh + h, z1),
            WALL,
            b.color(st.wall),
            pattern=M.WALL,
            wavelength=2.0,
            amp=0.12,
            params=(rng.uniform(0.25, 0.6), rng.uniform(0.5, 1.4)),
            caster=True,
        )
    elif kind == "hedge":
        h = rng.uniform(0.8, 1.9)
        t = rng.uniform(0.5, 1.2)
        b.box_between(
            (side * x, kh, z0),
            (side * (x + t), kh + h, z1),
            VEGETATION,
            b.color(st.foliage),
            pattern=M.FOLIAGE,
            wavelength=0.8,
            amp=0.5,
            params=tuple(b.color(st.foliage_light)),
            caster=True,
        )


def add_intersection(b: SceneBuilder, road: dict):
    """Cross-street buildings and the traffic lights on the four corners."""
    rng = b.rng
    z0, z1, csw = road["intersection"]
    rw = road["half_width"]
    urb = road["urbanity"]
    for side in (-1, 1):
        front = rw + road["sidewalk"][0 if side < 0 else 1]
        x = front + rng.uniform(0, 4)
        while x < X_FAR - 10:
            w = rng.uniform(10, 25)
            if rng.random() < 0.8:
                d = rng.uniform(10, 20)
                lo, hi = min(side * x, side * (x + w)), max(side * x, side * (x + w))
                # set back a little from the corner lots so no two facades are coplanar
                back = rng.uniform(0.3, 2.0)
                add_facing_building(b, lo, hi, z1 + csw + back, z1 + csw + back + d, urb)
                add_facing_building(b, lo, hi, z0 - csw - back - d, z0 - csw - back, urb)
            x += w + rng.uniform(0, 3)
    lit = int(rng.integers(3))
    for side in (-1, 1):
        xk = side * (rw + 0.5)
        for zc, face in ((z0 - 0.8, (0, 0, -1)), (z1 + 0.8, (0, 0, -1) if rng.random() < 0.5 else (0, 0, 1))):
            h = rng.uniform(3.2, 4.2)
            b.pole(xk, zc, h, rng.uniform(0.06, 0.09))
            # the housing sits in front of its pole, towards the traffic it faces
            b.traffic_light(xk, h - 0.6, zc + 0.2 * face[2], np.array(face, float), lit)
            if rng.random() < 0.5:  # a second light for the cross traffic
                b.traffic_light(xk + 0.25 * side, h - 0.6, zc, np.array((-side, 0, 0), float), (lit + 2) % 3)
    if rng.random() < 0.6:  # mast arm over our lanes
        xk = rw + 0.5
        h = rng.uniform(5.5, 6.5)
        b.pole(xk, z0 - 0.8, h, 0.12)
        arm = rng.uniform(3.0, rw + 0.5)
        b.box_between((xk - arm, h - 0.1, z0 - 0.86), (xk, h + 0.02, z0 - 0.74), POLE, b.color(b.style.pole))
        for k in range(1 + int(road["lanes"] > 1)):
            b.traffic_light(xk - arm + 0.4 + 1.8 * k, h - 0.7, z0 - 0.95, np.array((0, 0, -1.0)), lit)


def add_furniture(b: SceneBuilder, road: dict):
    """Street lamps, tree rows and sign poles along both sidewalks; lights at a zebra crossing."""
    rng, st = b.rng, b.style
    rw = road["half_width"]
    inter = road["intersection"]
    zones = [] if inter is None else [(inter[0] - inter[2] - 0.5, inter[1] + inter[2] + 0.5)]
    zend = road["end"] if road["end"] is not None else Z_MAX
    pole_color = b.color(st.pole)
    for side in (-1, 1):
        sw = road["sidewalk"][0 if side < 0 else 1]
        if rng.random() < 0.8:  # street lamps
            spacing = rng.uniform(22.0, 36.0)
            h = rng.uniform(6.5, 9.0)
            arm = rng.uniform(1.0, 2.2)
            z = rng.uniform(-5, spacing)
            while z < min(zend, 200.0):
                if not _blocked(z - 1, z + 1, zones):
                    x = side * (rw + 0.45)
                    b.pole(x, z, h, 0.09, pole_color)
                    b.box_between((x, h - 0.05, z - 0.05), (x - side * arm, h + 0.05, z + 0.05), POLE, pole_color)
                    b.box_between(
                        (x - side * (arm - 0.35), h - 0.18, z - 0.18),
                        (x - side * (arm + 0.25), h, z + 0.18),
                        POLE,
                        pole_color,
                    )
                z += spacing
        if sw > 2.4 and rng.random() < 0.25 + 0.45 * (1 - road["urbanity"]) + 0.2:  # tree row
            spacing = rng.uniform(7.0, 13.0)
            z = rng.uniform(-5, spacing)
            while z < min(zend, 160.0):
                if not _blocked(z - 3, z + 3, zones):
                    b.tree(side * (rw + rng.uniform(0.9, min(1.5, sw - 0.6))), z, scale=rng.uniform(0.8, 1.25))
                z += spacing * rng.uniform(0.85, 1.15)
        for _ in range(1 + rng.poisson(2.5)):  # sign poles
            z = rng.uniform(3.0, 70.0)
            if _blocked(z - 1, z + 1, zones):
                continue
            x = side * (rw + rng.uniform(0.3, 0.55))
            h = rng.uniform(2.4, 3.4)
            b.pole(x, z, h, rng.uniform(0.035, 0.05), pole_color)
            face = np.array((0, 0, -1.0)) if side > 0 or rng.random() < 0.5 else np.array((0, 0, 1.0))
            if rng.random() < 0.12:
                face = np.array((-side, 0, 0.0))
            y = h + 0.05
            for _k in range(1 + int(rng.random() < 0.4)):
                shape = int(rng.choice([0, 1, 2, 3, 4, 5], p=[0.25, 0.2, 0.2, 0.12, 0.1, 0.13]))
                y -= 0.4
                b.sign(x, y, z + 0.06 * face[2], face, shape)
                y -= 0.42
    if road["crossing"] is not None and inter is None:  # pedestrian lights at a zebra crossing
        lit = int(rng.integers(3))
        zc = road["crossing"][0] - 0.5
        for side in (-1, 1):
            if rng.random() < 0.75:
                h = rng.uniform(3.0, 3.6)
                x = side * (rw + 0.5)
                b.pole(x, zc, h, 0.07, pole_color)
                b.traffic_light(x, h - 0.6, zc - 0.15, np.array((0, 0, -1.0)), lit)
            if rng.random() < 0.6:
                b.sign(side * (rw + 0.5), 2.4, road["crossing"][1] + 0.5, np.array((0, 0, -1.0)), 2)
                b.pole(side * (rw + 0.5), road["crossing"][1] + 0.56, 2.6, 0.04, pole_color)


def add_vehicles(b: SceneBuilder, road: dict, ego: Ego):
    """Parked cars along the kerbs, traffic in both directions, the odd truck, bus or tram."""
    rng = b.rng
    rw, lw, n, park = road["half_width"], road["lane_width"], road["lanes"], road["parking"]
    inter = road["intersection"]
    blocked = []
    if inter is not None:
        blocked.append((inter[0] - inter[2] - 1.0, inter[1] + inter[2] + 1.0))
    if road["crossing"] is not None:
        blocked.append((road["crossing"][0] - 2.0, road["crossing"][1] + 1.0))
    zend = min(road["end"] if road["end"] is not None else Z_MAX, CAR_RANGE)
    if park > 0:
        for side in (-1, 1):
            occupancy = rng.uniform(0.25, 0.85)
            z = rng.uniform(-12.0, -4.0)
            while z < zend:
                gap = rng.uniform(0.6, 2.5)
                r = rng.random()
                heading = 0.0 if side > 0 or rng.random() < 0.3 else math.pi
                x = side * (rw - park / 2 + rng.uniform(-0.1, 0.15))
                if rng.random() > occupancy:
                    z += rng.uniform(4.0, 6.0)
                    continue
                length_guess = 7.0 if r < 0.03 else 5.0
                if _blocked(z, z + length_guess, blocked):
                    z += length_guess
                    continue
                if r < 0.03:
                    length = b.truck(x, z + 4.0, heading)
                elif r < 0.12:
                    b.motorcycle(x, z + 1.2, heading)
                    length = 2.4
                elif r < 0.2:
                    length = b.car(x + 0.0, z + 2.6, heading, kind="van")
                else:
                    length = b.car(x, z + 2.4, heading)
                z += length + gap
    # moving traffic: (lane centre x, direction)
    lanes = [((j + 0.5) * lw, 1.0) for j in range(n)] + [(-(j + 0.5) * lw, -1.0) for j in range(n)]
    tram_lane = None
    if rng.random() < 0.05:
        tram_lane = lanes[n] if rng.random() < 0.6 else lanes[0]
        road["tram"] = tram_lane[0]
    for lx, direction in lanes:
        ego_lane = direction > 0 and abs(lx - ego.x) < lw / 2
        if direction > 0:
            count = int(rng.random() < 0.45) if ego_lane else rng.poisson(0.8)
        else:
            count = rng.poisson(1.6)
        z = rng.uniform(8.0, 35.0) if ego_lane else rng.uniform(-4.0 if direction < 0 else 2.0, 40.0)
        if not ego_lane and direction > 0 and abs(lx - ego.x) < lw * 1.5:
            z = max(z, 3.0)
        if (lx, direction) == tram_lane:
            speed = rng.uniform(0.3, 0.8) if direction < 0 else ego.step * rng.uniform(0.8, 1.05)
            b.bus(lx, z + 15.0, 0.0 if direction > 0 else math.pi, velocity=(0, 0, direction * speed), tram=True)
            continue
        for _ in range(count):
            if z > zend:
                break
            speed = ego.step * rng.uniform(0.7, 1.1) if direction > 0 else rng.uniform(0.4, 1.4)
            vel = (0.0, 0.0, direction * speed)
            heading = 0.0 if direction > 0 else math.pi
            x = lx + rng.uniform(-0.25, 0.25)
            r = rng.random()
            if r < 0.05:
                length = b.bus(x, z + 6.5, heading, velocity=vel)
            elif r < 0.11:
                length = b.truck(x, z + 4.5, heading, velocity=vel)
            else:
                length = b.car(x, z + 2.5, heading, velocity=vel)
            z += length + rng.uniform(4.0, 30.0)


def add_people(b: SceneBuilder, road: dict, ego: Ego):
    """Pedestrians on the sidewalks and the crossing, cyclists, parked bicycles."""
    rng = b.rng
    rw = road["half_width"]
    walk = lambda: rng.uniform(1.0, 1.7) / FPS  # noqa: E731 -- metres per frame
    count = rng.poisson(rng.uniform(3.0, 11.0))
    for _ in range(count):
        side = 1 if rng.random() < 0.55 else -1
        sw = road["sidewalk"][0 if side < 0 else 1]
        verge = road["verge"][0 if side < 0 else 1]
        inner = 0.5 if verge == 0 else KERB_WIDTH + verge + 0.3  # on the footway, not the verge
        x = side * (rw + rng.uniform(inner, max(inner + 0.1, sw - 0.35)))
        z = rng.uniform(2.0, 45.0)
        group = 1 + int(rng.random() < 0.25) * int(rng.integers(1, 3))
        moving = rng.random() < 0.65
        direction = 1.0 if rng.random() < 0.5 else -1.0
        vel = (0.0, 0.0, direction * walk()) if moving else (0, 0, 0)
        heading = 0.0 if direction > 0 else math.pi
        if not moving:
            heading = rng.uniform(-math.pi, math.pi)
        for k in range(group):
            b.person(x - side * 0.6 * (k % 2), z + 0.5 * k, heading, velocity=vel)
    if road["crossing"] is not None and rng.random() < 0.45:
        za, zb = road["crossing"]
        for _ in range(1 + rng.poisson(1.0)):
            direction = 1.0 if rng.random() < 0.5 else -1.0
            x = rng.uniform(-rw + 0.5, rw - 0.5)
            if abs(x - ego.x) < 1.5:
                x = -abs(x) - 1.5
            b.person(
                x,
                rng.uniform(za + 0.5, zb - 0.5),
                direction * math.pi / 2,
                velocity=(direction * walk(), 0.0, 0.0),
            )
    if rng.random() < 0.4:  # cyclists riding along the kerb-side edge of the travel lanes
        for _ in range(1 + int(rng.random() < 0.3)):
            direction = 1.0 if rng.random() < 0.6 else -1.0
            x = direction * (rw - road["parking"] - 0.6)
            speed = rng.uniform(4.0, 7.0) / FPS
            b.bicycle(
                x,
                rng.uniform(6.0, 45.0),
                0.0 if direction > 0 else math.pi,
                velocity=(0.0, 0.0, direction * speed),
                rider=True,
            )
    if rng.random() < 0.15:  # a motorcyclist in our direction of travel
        x = rng.uniform(0.3, road["lanes"] * road["lane_width"] - 0.3)
        vel = (0.0, 0.0, ego.step * rng.uniform(0.8, 1.2))
        z = rng.uniform(6.0, 40.0)
        b.motorcycle(x, z, 0.0, velocity=vel)
        b.person(x, z - 0.15, 0.0, velocity=vel, cls=RIDER, seated=True, y0=0.12)
    if rng.random() < 0.3:  # a rack of parked bicycles on the sidewalk
        side = 1 if rng.random() < 0.5 else -1
        sw = road["sidewalk"][0 if side < 0 else 1]
        z = rng.uniform(5.0, 40.0)
        for k in range(int(rng.integers(1, 5))):
            b.bicycle(side * (rw + min(sw - 0.3, 1.4)), z + 0.7 * k, math.pi / 2 + rng.normal(0, 0.1))
