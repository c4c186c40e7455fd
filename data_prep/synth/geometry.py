"""Cameras, analytic primitives and vectorised ray casting.

Frames: the *world* has X to the right of the street, Y up, Z along the street.
Cameras use the OpenCV convention (x right, y down, z forward). The ray of pixel
(u, v) (column, row; integers are pixel centres) is ``R @ K^-1 [u, v, 1]`` with R
the camera-to-world rotation, so the ray parameter of a hit *is* the z-depth in
the camera frame -- exactly what ``inverse_warp`` lifts with ``depth * K^-1 [u,v,1]``.

Every primitive lives in its own local frame (``rot`` holds the world directions
of the local axes as columns, ``center`` the origin at frame 0) and moves by a
constant ``velocity`` per frame (moving objects only translate). Rays are cast
against one primitive at a time, but only for the pixels of the primitive's
projected bounding box, nearest first, skipping any primitive whose box lies
entirely behind what is already drawn -- which is what makes numpy fast enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
GROUND = 0  # primitive 0 is the ground plane Y = 0 (road level)
NEAR = 0.05  # metres; bounding boxes are clipped at this camera depth
GROUND_MAX_DEPTH = 3000.0  # ground hits beyond this are left to the sky (horizon row only)
_EPS_DIR = 1e-12

# the 8 corners of a unit box and its 12 edges, for bounding-box projection
_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
_EDGES = np.array([(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(_CORNERS[a] - _CORNERS[b]).sum() == 2])


@dataclass
class Scene:
    """Struct-of-arrays of P primitives (index 0 is the ground plane) plus global road data."""

    kind: np.ndarray  # (P,) int8: BOX, CYLINDER (local Y axis), ELLIPSOID
    center: np.ndarray  # (P,3) world position of the local origin at frame 0
    rot: np.ndarray  # (P,3,3) world_from_local rotation (columns = local axes in world)
    size: np.ndarray  # (P,3) box half extents | (radius, half height, radius) | ellipsoid radii
    velocity: np.ndarray  # (P,3) world translation per frame
    cls: np.ndarray  # (P,) uint8 Cityscapes train id
    moving: np.ndarray  # (P,) bool: not static scene geometry
    instance: np.ndarray  # (P,) int32 object the primitive belongs to (0: stuff, no object)
    caster: np.ndarray  # (P,) bool: casts sun shadows (static objects only)
    color: np.ndarray  # (P,3) float32 linear albedo
    pattern: np.ndarray  # (P,) int16 shading pattern id
    wavelength: np.ndarray  # (P,) float32 coarsest noise wavelength (m)
    amp: np.ndarray  # (P,) float32 noise amplitude
    params: np.ndarray  # (P,8) float32 pattern parameters
    offset: np.ndarray  # (P,3) float32 noise offset per object
    road: dict = field(default_factory=dict)  # global road layout for the road shader

    def __len__(self) -> int:
        return len(self.kind)

    def centers_at(self, frame: int) -> np.ndarray:
        """(P,3) local origins at frame ``frame`` (-1, 0, 1)."""
        return self.center + frame * self.velocity


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: K (3,3) pixel intrinsics, R (3,3) camera-to-world rotation, position (3,)."""

    K: np.ndarray
    R: np.ndarray
    position: np.ndarray
    height: int
    width: int

    def world_from_camera(self) -> np.ndarray:
        """(4,4) transform of camera coordinates into world coordinates."""
        m = np.eye(4)
        m[:3, :3] = self.R
        m[:3, 3] = self.position
        return m

    def ray_directions(self) -> np.ndarray:
        """(H,W,3) world ray directions R K^-1 [u,v,1] (camera-z component 1, not unit length)."""
        v, u = np.meshgrid(
            np.arange(self.height, dtype=np.float64), np.arange(self.width, dtype=np.float64), indexing="ij"
        )
        pix = np.stack([u, v, np.ones_like(u)], axis=-1)
        cam = pix @ np.linalg.inv(self.K).T
        return cam @ self.R.T


def relative_transform(src: Camera, dst: Camera) -> np.ndarray:
    """(4,4) transform from ``src``'s camera coordinates to ``dst``'s (X_dst = T @ X_src)."""
    return np.linalg.inv(dst.world_from_camera()) @ src.world_from_camera()


@dataclass
class Trace:
    """Per-pixel result of ray casting one frame (pid -1 = sky)."""

    depth: np.ndarray  # (H,W) camera z of the hit, inf for sky
    pid: np.ndarray  # (H,W) int32 primitive index or -1
    p_local: np.ndarray  # (H,W,3) hit point in the primitive's local frame
    n_local: np.ndarray  # (H,W,3) unit normal in the primitive's local frame
    rays: np.ndarray  # (H,W,3) world ray directions


def _safe(d: np.ndarray) -> np.ndarray:
    # rays exactly parallel to a slab give 0 components; nudge them so 1/d is finite
    return np.where(np.abs(d) < _EPS_DIR, _EPS_DIR, d)


def intersect_box(o: np.ndarray, d: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays ``o + t d`` (o (3,), d (M,3)) against the box [-half, half]: t (M,) (inf = miss), normal (M,3)."""
    inv = 1.0 / _safe(d)
    t0 = (-half - o) * inv
    t1 = (half - o) * inv
    tn = np.minimum(t0, t1)
    tf = np.maximum(t0, t1)
    axis = np.argmax(tn, axis=1)
    rows = np.arange(len(d))
    # plain fancy indexing: take/put_along_axis cost more than the arithmetic on these small arrays
    tnear = tn[rows, axis]
    tfar = tf.min(axis=1)
    hit = (tnear <= tfar) & (tnear > 0)
    n = np.zeros_like(d)
    n[rows, axis] = -np.sign(d[rows, axis])
    return np.where(hit, tnear, np.inf), n


def intersect_cylinder(o: np.ndarray, d: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Capped cylinder of radius size[0] around the local Y axis, |y| <= size[1]."""
    r, hh = size[0], size[1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[0] * d[:, 0] + o[2] * d[:, 2]
    c = o[0] ** 2 + o[2] ** 2 - r * r
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / a
    ys = o[1] + ts * d[:, 1]
    side_ok = (disc >= 0) & (a > 0) & (ts > 0) & (np.abs(ys) <= hh)
    t_side = np.where(side_ok, ts, np.inf)
    dy = _safe(d[:, 1])
    cap_y = np.where(d[:, 1] < 0, hh, -hh)  # a ray going down can only enter through the top cap
    tc = (cap_y - o[1]) / dy
    xc = o[0] + tc * d[:, 0]
    zc = o[2] + tc * d[:, 2]
    cap_ok = (tc > 0) & (xc * xc + zc * zc <= r * r)
    t_cap = np.where(cap_ok, tc, np.inf)
    use_cap = t_cap < t_side
    t = np.minimum(t_side, t_cap)
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    n = np.stack([p[:, 0] / r, np.zeros_like(t), p[:, 2] / r], axis=1)
    n[use_cap] = 0.0
    n[use_cap, 1] = np.sign(cap_y[use_cap])
    return t, n


def intersect_ellipsoid(o: np.ndarray, d: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoid with semi-axes ``radii`` centred at the local origin."""
    os_ = o / radii
    ds = d / radii
    a = np.einsum("ij,ij->i", ds, ds)
    b = ds @ os_
    c = os_ @ os_ - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    ok = (disc >= 0) & (t > 0)
    t = np.where(ok, t, np.inf)
    p = o + np.where(ok, t, 0.0)[:, None] * d
    n = p / (radii * radii)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return t, n


_INTERSECT = {BOX: intersect_box, CYLINDER: intersect_cylinder, ELLIPSOID: intersect_ellipsoid}


def local_half_extents(scene: Scene) -> np.ndarray:
    """(P,3) half extents of each primitive's local bounding box."""
    return scene.size.copy()


def screen_bounds(scene: Scene, cam: Camera, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projected bounding rectangles of all primitives.

    Returns ``rect`` (P,4) int [v0, v1, u0, u1) clipped to the image, ``zmin`` (P,) the
    smallest camera depth of the (near-clipped) bounding box, ``visible`` (P,) bool.
    The box is clipped at the near plane exactly: the clipped polytope's vertices are
    the corners in front plus the edge crossings, and its projection's bounding
    rectangle is that of those vertices.
    """
    corners = _CORNERS[None] * local_half_extents(scene)[:, None, :]  # (P,8,3)
    world = np.einsum("pij,pkj->pki", scene.rot, corners) + scene.centers_at(frame)[:, None, :]
    camc = (world - cam.position) @ cam.R  # (P,8,3) camera coordinates
    a, b = camc[:, _EDGES[:, 0]], camc[:, _EDGES[:, 1]]
    za, zb = a[..., 2], b[..., 2]
    crossing = (za > NEAR) != (zb > NEAR)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(crossing, (NEAR - za) / (zb - za), 0.0)
    cross_pts = a + s[..., None] * (b - a)
    pts = np.concatenate([camc, cross_pts], axis=1)
    valid = np.concatenate([camc[..., 2] > NEAR, crossing], axis=1)
    z = np.where(valid, np.maximum(pts[..., 2], NEAR), 1.0)
    K = cam.K
    u = K[0, 0] * pts[..., 0] / z + K[0, 1] * pts[..., 1] / z + K[0, 2]
    v = K[1, 1] * pts[..., 1] / z + K[1, 2]
    big = 1e9
    umin = np.where(valid, u, big).min(1)
    umax = np.where(valid, u, -big).max(1)
    vmin = np.where(valid, v, big).min(1)
    vmax = np.where(valid, v, -big).max(1)
    zmin = np.where(valid, z, np.inf).min(1)
    # pixel centres are integers: pixel u is covered when umin <= u <= umax (1 px slack)
    u0 = np.clip(np.floor(umin) - 1, 0, cam.width).astype(np.int64)
    u1 = np.clip(np.ceil(umax) + 2, 0, cam.width).astype(np.int64)
    v0 = np.clip(np.floor(vmin) - 1, 0, cam.height).astype(np.int64)
    v1 = np.clip(np.ceil(vmax) + 2, 0, cam.height).astype(np.int64)
    visible = valid.any(1) & (u1 > u0) & (v1 > v0)
    return np.stack([v0, v1, u0, u1], axis=1), zmin, visible


def _closer(t: np.ndarray, depth: np.ndarray, pid: np.ndarray, i: int) -> np.ndarray:
    """Where primitive ``i``'s hits ``t`` win over the current ``depth`` / ``pid``.

    Coplanar faces of overlapping boxes would otherwise win by rounding noise, which
    differs from frame to frame (z-fighting breaks photometric consistency); within a
    relative 1e-7 the lower primitive index wins, whatever the drawing order.
    """
    with np.errstate(invalid="ignore"):  # inf - inf where both miss: not a tie
        tie = np.abs(t - depth) <= 1e-7 * np.minimum(t, depth)
    return np.where(tie, i < pid, t < depth)


def trace(scene: Scene, cam: Camera, frame: int) -> Trace:
    """Cast one ray per pixel of ``cam`` into ``scene`` at ``frame``; nearest hit wins."""
    h, w = cam.height, cam.width
    rays = cam.ray_directions()
    depth = np.full((h, w), np.inf)
    pid = np.full((h, w), -1, dtype=np.int32)
    p_local = np.zeros((h, w, 3))
    n_local = np.zeros((h, w, 3))

    # the ground plane Y = 0 is hit by every ray going down
    oy = cam.position[1]
    dy = rays[..., 1]
    with np.errstate(divide="ignore"):
        tg = np.where(dy < 0, -oy / np.where(dy < 0, dy, -1.0), np.inf)
    tg = np.where(tg < GROUND_MAX_DEPTH, tg, np.inf)
    hit = np.isfinite(tg)
    depth[hit] = tg[hit]
    pid[hit] = GROUND
    p_local[hit] = cam.position + tg[hit, None] * rays[hit]
    n_local[hit] = (0.0, 1.0, 0.0)

    # flat views: writing through one index array is cheaper than through (row, column) pairs
    depth_flat, pid_flat = depth.reshape(-1), pid.reshape(-1)
    p_flat, n_flat = p_local.reshape(-1, 3), n_local.reshape(-1, 3)
    rect, zmin, visible = screen_bounds(scene, cam, frame)
    visible[GROUND] = False
    centers = scene.centers_at(frame)
    order = np.nonzero(visible)[0]
    order = order[np.argsort(zmin[order], kind="stable")]
    for i in order:
        v0, v1, u0, u1 = rect[i]
        dview = depth[v0:v1, u0:u1]
        if dview.max() < zmin[i]:  # fully hidden behind what is drawn already (depth has no NaN)
            continue
        rot = scene.rot[i]
        o = rot.T @ (cam.position - centers[i])
        d = rays[v0:v1, u0:u1].reshape(-1, 3) @ rot
        t, n = _INTERSECT[int(scene.kind[i])](o, d, scene.size[i])
        closer = _closer(t, dview.reshape(-1), pid[v0:v1, u0:u1].reshape(-1), i)
        if not closer.any():
            continue
        idx = np.nonzero(closer)[0]
        rr, cc = np.divmod(idx, u1 - u0)
        flat = (rr + v0) * w + (cc + u0)  # pixel indices into the (H*W) views below
        t_hit = t.take(idx)
        depth_flat[flat] = t_hit
        pid_flat[flat] = i
        p_flat[flat] = o + t_hit[:, None] * d.take(idx, axis=0)
        n_flat[flat] = n.take(idx, axis=0)
    return Trace(depth=depth, pid=pid, p_local=p_local, n_local=n_local, rays=rays)


def trace_rays(scene: Scene, cam: Camera, frame: int, rays: np.ndarray, candidates: np.ndarray) -> Trace:
    """Cast arbitrary rays from ``cam``'s centre, each against its own candidate primitives only.

    Used for anti-aliasing: the sub-pixel rays of an edge pixel can only hit what the
    centre rays of its 3x3 neighbourhood hit (the ground is always tested), so they
    need no culling. ``rays`` (N,3) world directions with camera-z 1, ``candidates``
    (N,C) primitive indices (-1 = none). Returns a Trace whose arrays have leading shape (N,).
    """
    n = len(rays)
    depth = np.full(n, np.inf)
    pid = np.full(n, -1, dtype=np.int32)
    p_local = np.zeros((n, 3))
    n_local = np.zeros((n, 3))
    oy = cam.position[1]
    down = rays[:, 1] < 0
    tg = np.full(n, np.inf)
    tg[down] = -oy / rays[down, 1]
    hit = tg < GROUND_MAX_DEPTH
    depth[hit] = tg[hit]
    pid[hit] = GROUND
    p_local[hit] = cam.position + tg[hit, None] * rays[hit]
    n_local[hit] = (0.0, 1.0, 0.0)

    ray_idx = np.repeat(np.arange(n), candidates.shape[1])
    cand = candidates.reshape(-1).astype(np.int64)
    keep = cand > GROUND
    pairs = np.sort(cand[keep] * n + ray_idx[keep])  # grouped by primitive
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]  # a ray lists a neighbour's primitive once
    prims, rays_of = np.divmod(pairs, n)
    starts = np.flatnonzero(np.r_[True, prims[1:] != prims[:-1]])
    centers = scene.centers_at(frame)
    for a, b in zip(starts, np.r_[starts[1:], len(prims)]):
        i = int(prims[a])
        idx = rays_of[a:b]
        rot = scene.rot[i]
        o = rot.T @ (cam.position - centers[i])
        d = rays.take(idx, axis=0) @ rot
        t, nl = _INTERSECT[int(scene.kind[i])](o, d, scene.size[i])
        closer = _closer(t, depth.take(idx), pid.take(idx), i)
        if not closer.any():
            continue
        won = np.nonzero(closer)[0]
        sel = idx.take(won)
        t_hit = t.take(won)
        depth[sel] = t_hit
        pid[sel] = i
        p_local[sel] = o + t_hit[:, None] * d.take(won, axis=0)
        n_local[sel] = nl.take(won, axis=0)
    return Trace(depth=depth, pid=pid, p_local=p_local, n_local=n_local, rays=rays)
