"""The two visual domains: ``city`` (the Cityscapes-like target) and ``game`` (a synthetic source).

A style fixes the camera ranges, the palettes (sRGB, 0..255) each object draws its
colour from, the lighting and the texture statistics. ``game`` differs on purpose in
every one of them -- wider field of view, lower camera, saturated warm palette,
hard sun, busier textures -- so that domain adaptation has a real gap to close.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Style:
    """Everything that differs between the two domains."""

    name: str
    domain: str
    # camera
    fx_over_width: tuple[float, float]  # focal length / image width, uniform range
    camera_height: tuple[float, float]  # metres above the road
    pitch_deg: float  # std of the camera's static pitch (negative = looking down)
    pitch_bias_deg: float
    # lighting
    sun_strength: tuple[float, float]
    ambient_strength: tuple[float, float]
    sun_color: RGB
    sky_light_color: RGB
    sun_elevation_deg: tuple[float, float]
    exposure: tuple[float, float]
    haze_distance: tuple[float, float]  # metres at which 63% of the colour is haze
    sky_zenith: tuple[RGB, ...]
    sky_horizon: tuple[RGB, ...]
    cloud_amount: tuple[float, float]
    saturation: float  # post-process saturation multiplier
    contrast: float  # post-process contrast around mid grey
    # texture statistics
    texture_amp: float  # multiplies every material's noise amplitude
    texture_scale: float  # multiplies every material's noise wavelength
    # palettes
    asphalt: tuple[RGB, ...]
    marking: RGB
    sidewalk: tuple[RGB, ...]
    kerb: tuple[RGB, ...]
    facade: tuple[RGB, ...]
    roof: tuple[RGB, ...]
    glass: tuple[RGB, ...]
    shopfront: tuple[RGB, ...]
    wall: tuple[RGB, ...]
    fence: tuple[RGB, ...]
    pole: tuple[RGB, ...]
    foliage: tuple[RGB, ...]
    foliage_light: tuple[RGB, ...]
    bark: tuple[RGB, ...]
    grass: tuple[RGB, ...]
    soil: tuple[RGB, ...]
    car_paint: tuple[RGB, ...]
    truck_paint: tuple[RGB, ...]
    bus_paint: tuple[RGB, ...]
    tram_paint: tuple[RGB, ...]
    clothes: tuple[RGB, ...]
    skin: tuple[RGB, ...]
    tyre: RGB
    rim: RGB


CITY = Style(
    name="city",
    domain="synth-city",
    fx_over_width=(1.06, 1.14),
    camera_height=(1.42, 1.58),
    pitch_deg=0.8,
    pitch_bias_deg=-0.5,
    sun_strength=(0.25, 0.95),
    ambient_strength=(0.55, 0.8),
    sun_color=(255, 244, 226),
    sky_light_color=(205, 218, 235),
    sun_elevation_deg=(30.0, 65.0),
    exposure=(0.85, 1.1),
    haze_distance=(350.0, 900.0),
    sky_zenith=((150, 175, 205), (170, 186, 204), (120, 155, 200), (196, 202, 210)),
    sky_horizon=((214, 222, 230), (226, 230, 233), (200, 212, 225), (232, 232, 232)),
    cloud_amount=(0.2, 0.9),
    saturation=0.8,
    contrast=0.95,
    texture_amp=1.0,
    texture_scale=1.0,
    asphalt=((92, 92, 96), (80, 82, 86), (104, 102, 100), (70, 72, 76)),
    marking=(218, 218, 210),
    sidewalk=((150, 146, 140), (132, 130, 128), (160, 150, 140), (124, 122, 126)),
    kerb=((176, 174, 170), (160, 158, 156), (190, 184, 176)),
    facade=(
        (186, 176, 160),
        (170, 160, 146),
        (150, 142, 134),
        (198, 192, 180),
        (140, 128, 116),
        (176, 170, 168),
        (206, 198, 176),
        (128, 120, 118),
        (168, 146, 124),
        (196, 184, 168),
    ),
    roof=((90, 84, 82), (110, 76, 64), (78, 80, 86)),
    glass=((52, 60, 70), (66, 74, 86), (44, 48, 56), (80, 88, 96)),
    shopfront=((60, 62, 66), (96, 84, 70), (120, 118, 112), (54, 70, 80)),
    wall=((160, 156, 150), (140, 134, 126), (176, 168, 156), (120, 116, 112)),
    fence=((110, 106, 96), (90, 92, 88), (130, 118, 98), (70, 80, 72)),
    pole=((120, 122, 124), (96, 98, 100), (140, 140, 138), (70, 72, 74)),
    foliage=((70, 92, 48), (58, 80, 46), (84, 100, 56), (62, 86, 60)),
    foliage_light=((120, 140, 80), (104, 126, 74), (132, 144, 92)),
    bark=((86, 74, 62), (70, 62, 56), (100, 88, 72)),
    grass=((104, 122, 70), (92, 112, 64), (118, 128, 80)),
    soil=((126, 112, 92), (112, 102, 88)),
    car_paint=(
        (40, 40, 44),
        (200, 200, 204),
        (150, 152, 156),
        (96, 98, 104),
        (30, 44, 80),
        (120, 24, 24),
        (230, 230, 228),
        (60, 70, 60),
        (20, 20, 22),
        (170, 170, 160),
    ),
    truck_paint=((220, 220, 220), (170, 40, 30), (40, 70, 140), (200, 180, 60)),
    bus_paint=((220, 200, 40), (200, 40, 40), (230, 230, 230), (40, 110, 160)),
    tram_paint=((230, 220, 200), (200, 40, 40), (240, 200, 40)),
    clothes=(
        (30, 30, 36),
        (50, 56, 80),
        (120, 120, 124),
        (160, 40, 40),
        (200, 196, 186),
        (80, 60, 40),
        (40, 80, 120),
        (100, 110, 70),
        (20, 20, 20),
        (180, 150, 110),
    ),
    skin=((224, 184, 150), (190, 140, 104), (120, 84, 60), (236, 200, 170)),
    tyre=(30, 30, 32),
    rim=(150, 152, 156),
)

GAME = Style(
    name="game",
    domain="synth-game",
    fx_over_width=(0.9, 1.0),
    camera_height=(1.15, 1.35),
    pitch_deg=1.2,
    pitch_bias_deg=-1.5,
    sun_strength=(1.0, 1.4),
    ambient_strength=(0.35, 0.5),
    sun_color=(255, 226, 180),
    sky_light_color=(160, 190, 240),
    sun_elevation_deg=(35.0, 70.0),
    exposure=(1.0, 1.2),
    haze_distance=(180.0, 450.0),
    sky_zenith=((40, 100, 200), (60, 120, 210), (30, 80, 180)),
    sky_horizon=((190, 210, 235), (230, 200, 170), (170, 200, 230)),
    cloud_amount=(0.0, 0.45),
    saturation=1.35,
    contrast=1.2,
    texture_amp=1.6,
    texture_scale=0.6,
    asphalt=((86, 86, 92), (76, 78, 84), (96, 94, 96)),
    marking=(236, 226, 150),
    sidewalk=((180, 166, 146), (170, 150, 130), (196, 180, 160)),
    kerb=((210, 200, 180), (200, 190, 170)),
    facade=(
        (170, 90, 70),
        (200, 150, 100),
        (220, 200, 160),
        (150, 70, 60),
        (120, 140, 160),
        (230, 220, 200),
        (190, 110, 80),
        (160, 170, 120),
        (210, 170, 120),
    ),
    roof=((120, 60, 50), (60, 60, 70), (140, 100, 70)),
    glass=((40, 70, 110), (70, 110, 150), (30, 50, 80)),
    shopfront=((180, 60, 40), (40, 120, 160), (220, 180, 60), (60, 60, 60)),
    wall=((200, 170, 140), (170, 120, 100), (220, 210, 190)),
    fence=((150, 100, 60), (60, 60, 60), (190, 160, 120)),
    pole=((60, 70, 60), (40, 40, 44), (170, 170, 160)),
    foliage=((50, 110, 30), (70, 130, 40), (40, 90, 30)),
    foliage_light=((140, 190, 60), (170, 200, 80)),
    bark=((110, 80, 50), (90, 66, 44)),
    grass=((90, 150, 50), (120, 160, 60), (110, 140, 40)),
    soil=((150, 110, 70), (170, 130, 90)),
    car_paint=(
        (200, 30, 30),
        (240, 200, 40),
        (30, 90, 200),
        (20, 20, 24),
        (240, 240, 240),
        (40, 160, 80),
        (240, 120, 30),
        (120, 40, 140),
        (180, 180, 190),
    ),
    truck_paint=((240, 240, 240), (40, 120, 200), (220, 90, 30)),
    bus_paint=((240, 120, 30), (40, 160, 200), (240, 240, 240)),
    tram_paint=((40, 160, 90), (240, 240, 240)),
    clothes=(
        (200, 40, 40),
        (40, 80, 200),
        (240, 200, 40),
        (30, 30, 30),
        (240, 240, 240),
        (60, 160, 80),
        (220, 110, 160),
        (120, 80, 50),
    ),
    skin=((240, 190, 150), (200, 140, 100), (130, 90, 60)),
    tyre=(24, 22, 22),
    rim=(200, 200, 210),
)

STYLES = {s.name: s for s in (CITY, GAME)}


def get_style(name: str) -> Style:
    """The style called ``name`` ('city' or 'game')."""
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {name!r}") from None
