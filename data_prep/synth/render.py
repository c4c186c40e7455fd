"""``render_sample``: one frame triplet of a random street with exact ground truth."""

from __future__ import annotations

import math
import zlib

import numpy as np

from data_prep.synth.geometry import Camera, Scene, Trace, relative_transform, trace, trace_rays
from data_prep.synth.layout import Ego, generate_street, pitch, yaw
from data_prep.synth.shading import Lighting, sample_lighting, shade, tone_map
from data_prep.synth.styles import Style, get_style
from sdeseg.data.classes import INSTANCE_DIVISOR, train_ids_to_label_ids

SKY = 10  # Cityscapes train id of sky
FRAMES = (-1, 0, 1)
# camera axes (x right, y down, z forward) expressed in the world (X right, Y up, Z along the street)
_CAM_TO_WORLD_AXES = np.diag([1.0, -1.0, 1.0])
# rotated-grid sub-pixel offsets (u, v): their mean is the pixel centre, so anti-aliased
# colours stay centred on the pixel whose depth and label are given
SUBSAMPLES = np.array([(-0.125, -0.375), (0.375, -0.125), (0.125, 0.375), (-0.375, 0.125)])


def sample_seed(seed: int, split: str, style: str, index: int) -> np.random.SeedSequence:
    """Independent random stream per (seed, split, style, index): train, val and test never share a scene."""
    return np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), zlib.crc32(style.encode()), int(index)])


def intrinsics(rng: np.random.Generator, style: Style, height: int, width: int) -> np.ndarray:
    """(3,3) K: fx = fy in the style's range; principal point at the (pixel-centre) image centre, jittered."""
    fx = rng.uniform(*style.fx_over_width) * width
    cx = (width - 1) / 2 + rng.uniform(-0.01, 0.01) * width
    cy = (height - 1) / 2 + rng.uniform(-0.01, 0.01) * height
    return np.array([[fx, 0.0, cx], [0.0, fx, cy], [0.0, 0.0, 1.0]])


def ego_cameras(
    rng: np.random.Generator, style: Style, ego: Ego, K: np.ndarray, height: int, width: int
) -> dict[int, Camera]:
    """Cameras of frames -1, 0, 1 on a constant-curvature path with small pitch / roll jitter."""
    cam_h = rng.uniform(*style.camera_height)
    pitch0 = math.radians(style.pitch_bias_deg + rng.normal(0.0, style.pitch_deg))
    roll0 = math.radians(rng.normal(0.0, 0.3))
    cams = {}
    for k in FRAMES:
        heading = ego.heading + k * ego.yaw_rate
        # the position moves along the chord of the arc between the two headings
        mid = ego.heading + 0.5 * k * ego.yaw_rate
        pos = np.array([ego.x + k * ego.step * math.sin(mid), cam_h, k * ego.step * math.cos(mid)])
        if k != 0:
            pos[1] += rng.normal(0.0, 0.01)  # suspension bounce
        th = pitch0 + (math.radians(rng.normal(0.0, 0.15)) if k != 0 else 0.0)
        ph = roll0 + (math.radians(rng.normal(0.0, 0.1)) if k != 0 else 0.0)
        c, s = math.cos(ph), math.sin(ph)
        roll = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        R = yaw(heading) @ pitch(th) @ roll @ _CAM_TO_WORLD_AXES
        cams[k] = Camera(K=K, R=R, position=pos, height=height, width=width)
    return cams


def edge_pixels(tr: Trace) -> np.ndarray:
    """(H,W) bool: pixels whose 4-neighbourhood sees another primitive or another face."""
    pid = np.pad(tr.pid, 1, mode="edge")
    nrm = np.pad(tr.n_local, ((1, 1), (1, 1), (0, 0)), mode="edge")
    c_pid, c_n = pid[1:-1, 1:-1], nrm[1:-1, 1:-1]
    edge = np.zeros(tr.pid.shape, dtype=bool)
    for dv, du in ((0, 1), (2, 1), (1, 0), (1, 2)):
        p = pid[dv : dv + tr.pid.shape[0], du : du + tr.pid.shape[1]]
        n = nrm[dv : dv + tr.pid.shape[0], du : du + tr.pid.shape[1]]
        edge |= (p != c_pid) | (np.einsum("hwc,hwc->hw", n, c_n) < 0.9)
    return edge


def instance_map(scene: Scene, tr: Trace) -> np.ndarray:
    """(H,W) uint16 Cityscapes instanceIds of a traced frame.

    Pixels of a thing object hold ``label id * 1000 + index``, with the index counting that
    class's visible objects from 0 in the order the layout created them; every other pixel
    holds the label id of its class (sky: 23). The class comes from the same primitive as
    the semantic label, so ``id // 1000`` agrees with the label on every thing pixel.
    """
    sky = tr.pid < 0
    pid = np.maximum(tr.pid, 0)
    train = np.where(sky, SKY, scene.cls[pid]).astype(np.uint8)
    label_ids = train_ids_to_label_ids(train).astype(np.int64)
    obj = np.where(sky, 0, scene.instance[pid])
    out = label_ids.copy()
    visible = obj > 0
    if visible.any():
        # (object, label id) pairs; an object's parts share one class, the pair only guards it
        pairs, inverse = np.unique(obj[visible] * 256 + label_ids[visible], return_inverse=True)
        cls = pairs % 256
        order = np.lexsort((pairs // 256, cls))  # by class, then by object id (= creation order)
        first = np.searchsorted(cls[order], cls[order])  # where each class's run starts
        index = np.empty(len(pairs), dtype=np.int64)
        index[order] = np.arange(len(pairs)) - first
        out[visible] = (cls * INSTANCE_DIVISOR + index)[inverse.reshape(-1)]
    return out.astype(np.uint16)


def render_frame(
    scene: Scene, cam: Camera, frame: int, light: Lighting, style: Style, antialias: bool = True
) -> tuple[np.ndarray, Trace]:
    """One frame: uint8 (H,W,3) image and the centre-ray trace (for depth and labels).

    Pixels on silhouettes and creases are re-rendered with four sub-pixel rays and
    averaged (in linear light), so geometric edges are anti-aliased like textures are.
    """
    tr = trace(scene, cam, frame)
    rgb = shade(scene, tr, cam, light, style)
    if antialias:
        edge = edge_pixels(tr)
        vs, us = np.nonzero(edge)
        if len(vs):
            padded = np.pad(tr.pid, 1, mode="constant", constant_values=-1)
            cand = np.sort(np.stack([padded[vs + dv, us + du] for dv in range(3) for du in range(3)], axis=1), 1)
            cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # each neighbour primitive once
            pix = np.stack(
                [
                    us[:, None] + SUBSAMPLES[None, :, 0],
                    vs[:, None] + SUBSAMPLES[None, :, 1],
                    np.ones((len(vs), len(SUBSAMPLES))),
                ],
                axis=-1,
            ).reshape(-1, 3)
            rays = pix @ np.linalg.inv(cam.K).T @ cam.R.T
            sub = trace_rays(scene, cam, frame, rays, np.repeat(cand, len(SUBSAMPLES), axis=0))
            colors = shade(scene, sub, cam, light, style)
            rgb[vs, us] = colors.reshape(len(vs), len(SUBSAMPLES), 3).mean(1)
    return tone_map(rgb, light, style), tr


def render_sample(
    index: int, split: str, size: tuple[int, int] = (96, 192), style: str = "city", seed: int = 0
) -> dict:
    """Render one training sample: frames t-1, t, t+1 of a random street and exact ground truth.

    Args:
        index: sample number within the split.
        split: "train", "val" or "test" (any string; it only seeds the scene).
        size: (H, W) in pixels.
        style: "city" or "game".
        seed: dataset seed.

    Returns:
        dict with ``frames`` {-1, 0, 1: (H,W,3) uint8}, ``label`` (H,W) uint8 train ids
        (sky 10), ``depth`` (H,W) float32 camera z in metres (0 on sky), ``instance`` (H,W)
        uint16 Cityscapes instanceIds of frame t (:func:`instance_map`), ``K`` (3,3),
        ``T_prev`` / ``T_next`` (4,4) frame-t camera -> frame t-1 / t+1 camera,
        ``static`` (H,W) bool (frame-t pixels on static geometry) and ``info`` (dict: camera
        height, speed, primitive count and ``world_from_camera`` (4,4) of frame t, for tests).
    """
    st = get_style(style)
    height, width = int(size[0]), int(size[1])
    rng = np.random.default_rng(sample_seed(seed, split, style, index))
    scene, ego = generate_street(rng, st)
    K = intrinsics(rng, st, height, width)
    cams = ego_cameras(rng, st, ego, K, height, width)
    light = sample_lighting(rng, st)
    frames = {}
    for k in FRAMES:
        frames[k], tr = render_frame(scene, cams[k], k, light, st)
        if k == 0:
            sky = tr.pid < 0
            label = np.where(sky, SKY, scene.cls[np.maximum(tr.pid, 0)]).astype(np.uint8)
            depth = np.where(sky, 0.0, tr.depth).astype(np.float32)
            static = ~sky & ~scene.moving[np.maximum(tr.pid, 0)]
            instance = instance_map(scene, tr)
    return {
        "frames": frames,
        "label": label,
        "depth": depth,
        "instance": instance,
        "K": K,
        "T_prev": relative_transform(cams[0], cams[-1]),
        "T_next": relative_transform(cams[0], cams[1]),
        "static": static,
        "info": {
            "camera_height": float(cams[0].position[1]),
            # frame t camera -> world (X right, Y up, Z along the street, road at Y = 0)
            "world_from_camera": cams[0].world_from_camera(),
            "speed_m_per_frame": float(ego.step),
            "primitives": len(scene),
        },
    }
