"""Triton kernels for inverse warping: back-project, transform, project and sample in one pass.

A program owns ``BLOCK`` target pixels of one image (grid axis 1 = batch, axis 0 = pixel
blocks). The geometry (K^-1 by cofactors, the pose, the projection) is computed once per
pixel in fp32 registers and reused for every channel, so neither the camera points nor the
sampling grid ever go to memory; only src is gathered (4 corners per channel) and the
warped image written.

Sampling follows ``grid_sample(bilinear, padding_mode="border", align_corners=True)``:
the coordinate is clipped to [0, size-1] (gradient 0 where clipped, as torch does), corners
past the last row/column get weight 0. The round trip through normalised grid coordinates
that the reference makes is the identity in exact arithmetic and is skipped.

Backward (one kernel): recompute the geometry, then per channel scatter ``w * grad`` into
grad_src (atomic adds: several target pixels can sample the same source pixel) and
accumulate d(out)/d(coords); chain that through projection, pose and back-projection to
grad_depth (per pixel) and grad_T (per-program partial sums, reduced by the caller —
deterministic, no atomics on 12 hot addresses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdeseg.ops.inverse_warp.reference import Z_MIN

# Pixels per program (4 warps). The backward keeps ~40 fp32 values live per pixel: at 256
# pixels ptxas (sm_90) gives it 100 registers, at 512 it needs 168, so it gets the smaller block.
BLOCK_FWD = 512
BLOCK_BWD = 256
T_GRAD_TERMS = 12  # the differentiable entries of T: rows 0..2 (R | t)
_Z_MIN = tl.constexpr(Z_MIN)  # jit code may only read constexpr globals


# Kernels here use Triton builtins only, not the triton.language helpers that are themselves
# @triton.jit functions (tl.zeros, tl.sum, ...): those are built when triton is imported, so
# they would be compiled-mode objects the interpreter cannot call if triton was imported
# before TRITON_INTERPRET=1 was set (see tests/test_ops_fused.py).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _load_camera(t_ptr, k_ptr, b):
    """The 12 pose entries T[b, :3, :] and the 9 entries of K[b] as fp32 scalars."""
    tb = t_ptr + b.to(tl.int64) * 16
    kb = k_ptr + b.to(tl.int64) * 9
    t00 = tl.load(tb + 0).to(tl.float32)
    t01 = tl.load(tb + 1).to(tl.float32)
    t02 = tl.load(tb + 2).to(tl.float32)
    t03 = tl.load(tb + 3).to(tl.float32)
    t10 = tl.load(tb + 4).to(tl.float32)
    t11 = tl.load(tb + 5).to(tl.float32)
    t12 = tl.load(tb + 6).to(tl.float32)
    t13 = tl.load(tb + 7).to(tl.float32)
    t20 = tl.load(tb + 8).to(tl.float32)
    t21 = tl.load(tb + 9).to(tl.float32)
    t22 = tl.load(tb + 10).to(tl.float32)
    t23 = tl.load(tb + 11).to(tl.float32)
    k00 = tl.load(kb + 0).to(tl.float32)
    k01 = tl.load(kb + 1).to(tl.float32)
    k02 = tl.load(kb + 2).to(tl.float32)
    k10 = tl.load(kb + 3).to(tl.float32)
    k11 = tl.load(kb + 4).to(tl.float32)
    k12 = tl.load(kb + 5).to(tl.float32)
    k20 = tl.load(kb + 6).to(tl.float32)
    k21 = tl.load(kb + 7).to(tl.float32)
    k22 = tl.load(kb + 8).to(tl.float32)
    return (t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
            k00, k01, k02, k10, k11, k12, k20, k21, k22)  # fmt: skip


@triton.jit
def _rays(k00, k01, k02, k10, k11, k12, k20, k21, k22, u, v):
    """K^-1 [u, v, 1] with K^-1 from cofactors (general 3x3 K, no host-side inverse)."""
    c00 = k11 * k22 - k12 * k21
    c01 = k12 * k20 - k10 * k22
    c02 = k10 * k21 - k11 * k20
    inv_det = 1.0 / (k00 * c00 + k01 * c01 + k02 * c02)
    rx = (c00 * u + (k02 * k21 - k01 * k22) * v + (k01 * k12 - k02 * k11)) * inv_det
    ry = (c01 * u + (k00 * k22 - k02 * k20) * v + (k02 * k10 - k00 * k12)) * inv_det
    rz = (c02 * u + (k01 * k20 - k00 * k21) * v + (k00 * k11 - k01 * k10)) * inv_det
    return rx, ry, rz


@triton.jit
def _project(
    t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
    k00, k01, k02, k10, k11, k12, k20, k21, k22, u, v, d,
):  # fmt: skip
    """Target pixel (u, v) at depth d -> source pixel (x, y), with the intermediates the
    backward needs: rays r = K^-1 [u,v,1], camera point c = d r, moved point m = R c + t,
    clamped depth z, normalised point p = m / z."""
    rx, ry, rz = _rays(k00, k01, k02, k10, k11, k12, k20, k21, k22, u, v)
    cx = rx * d
    cy = ry * d
    cz = rz * d
    mx = t00 * cx + t01 * cy + t02 * cz + t03
    my = t10 * cx + t11 * cy + t12 * cz + t13
    mz = t20 * cx + t21 * cy + t22 * cz + t23
    z = tl.maximum(mz, _Z_MIN)
    px = mx / z
    py = my / z
    pz = mz / z  # 1 unless z was clamped; the reference keeps it in K @ (moved / z)
    x = k00 * px + k01 * py + k02 * pz
    y = k10 * px + k11 * py + k12 * pz
    return rx, ry, rz, cx, cy, cz, mx, my, mz, z, px, py, pz, x, y


@triton.jit
def _corners(x, y, W, H):
    """Border-clipped sample position: corner indices, bilinear fractions and in-range flags."""
    ix = tl.minimum(tl.maximum(x, 0.0), (W - 1.0))
    iy = tl.minimum(tl.maximum(y, 0.0), (H - 1.0))
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    ax = ix - fx  # weight of the right column
    ay = iy - fy  # weight of the bottom row
    bx = (fx + 1.0) - ix
    by = (fy + 1.0) - iy
    # After clipping only the +1 neighbours can leave the image (then their weight is 0).
    has_x1 = x0 + 1 < W
    has_y1 = y0 + 1 < H
    return ix, iy, x0, y0, ax, ay, bx, by, has_x1, has_y1


@triton.jit
def inverse_warp_fwd_kernel(src_ptr, depth_ptr, t_ptr, k_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr):
    """out[b, :, p] = bilinear(src[b], project(K, T[b], depth[b, p] * K^-1 [u, v, 1]))."""
    b = tl.program_id(1)
    HW = H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    u = (offs % W).to(tl.float32)
    v = (offs // W).to(tl.float32)
    (t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
     k00, k01, k02, k10, k11, k12, k20, k21, k22) = _load_camera(t_ptr, k_ptr, b)  # fmt: skip
    d = tl.load(depth_ptr + b.to(tl.int64) * HW + offs, mask=inb, other=1.0).to(tl.float32)
    (rx, ry, rz, cx, cy, cz, mx, my, mz, z, px, py, pz, x, y) = _project(
        t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
        k00, k01, k02, k10, k11, k12, k20, k21, k22, u, v, d,
    )  # fmt: skip
    ix, iy, x0, y0, ax, ay, bx, by, has_x1, has_y1 = _corners(x, y, W, H)
    w_nw = bx * by
    w_ne = ax * by
    w_sw = bx * ay
    w_se = ax * ay
    m_ne = inb & has_x1
    m_sw = inb & has_y1
    m_se = m_ne & has_y1
    p_nw = y0 * W + x0
    src = src_ptr + b.to(tl.int64) * C * HW
    dst = out_ptr + b.to(tl.int64) * C * HW + offs
    for _ in range(C):
        v_nw = tl.load(src + p_nw, mask=inb, other=0.0).to(tl.float32)
        v_ne = tl.load(src + p_nw + 1, mask=m_ne, other=0.0).to(tl.float32)
        v_sw = tl.load(src + p_nw + W, mask=m_sw, other=0.0).to(tl.float32)
        v_se = tl.load(src + p_nw + W + 1, mask=m_se, other=0.0).to(tl.float32)
        val = v_nw * w_nw + v_ne * w_ne + v_sw * w_sw + v_se * w_se
        tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=inb)
        src += HW
        dst += HW


@triton.jit
def inverse_warp_bwd_kernel(
    grad_ptr, src_ptr, depth_ptr, t_ptr, k_ptr,
    gsrc_ptr, gdepth_ptr, gt_part_ptr, C, H, W,
    NEED_SRC: tl.constexpr, NEED_GEOM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Gradients w.r.t. src (NEED_SRC: atomic scatter into fp32 gsrc, zero-filled by the caller)
    and w.r.t. depth and T (NEED_GEOM: gdepth per pixel, 12 partial sums per program in
    gt_part[b, program, :])."""
    b = tl.program_id(1)
    pid = tl.program_id(0)
    HW = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    u = (offs % W).to(tl.float32)
    v = (offs // W).to(tl.float32)
    (t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
     k00, k01, k02, k10, k11, k12, k20, k21, k22) = _load_camera(t_ptr, k_ptr, b)  # fmt: skip
    d = tl.load(depth_ptr + b.to(tl.int64) * HW + offs, mask=inb, other=1.0).to(tl.float32)
    (rx, ry, rz, cx, cy, cz, mx, my, mz, z, px, py, pz, x, y) = _project(
        t00, t01, t02, t03, t10, t11, t12, t13, t20, t21, t22, t23,
        k00, k01, k02, k10, k11, k12, k20, k21, k22, u, v, d,
    )  # fmt: skip
    ix, iy, x0, y0, ax, ay, bx, by, has_x1, has_y1 = _corners(x, y, W, H)
    m_ne = inb & has_x1
    m_sw = inb & has_y1
    m_se = m_ne & has_y1
    p_nw = y0 * W + x0
    g_base = grad_ptr + b.to(tl.int64) * C * HW + offs
    src = src_ptr + b.to(tl.int64) * C * HW
    gsrc = gsrc_ptr + b.to(tl.int64) * C * HW
    gix = tl.full([BLOCK], 0.0, tl.float32)
    giy = tl.full([BLOCK], 0.0, tl.float32)
    for _ in range(C):
        g = tl.load(g_base, mask=inb, other=0.0).to(tl.float32)
        if NEED_SRC:
            # Relaxed: only the final sums matter, no ordering with other memory operations.
            tl.atomic_add(gsrc + p_nw, g * (bx * by), mask=inb, sem="relaxed")
            tl.atomic_add(gsrc + p_nw + 1, g * (ax * by), mask=m_ne, sem="relaxed")
            tl.atomic_add(gsrc + p_nw + W, g * (bx * ay), mask=m_sw, sem="relaxed")
            tl.atomic_add(gsrc + p_nw + W + 1, g * (ax * ay), mask=m_se, sem="relaxed")
        if NEED_GEOM:
            v_nw = tl.load(src + p_nw, mask=inb, other=0.0).to(tl.float32)
            v_ne = tl.load(src + p_nw + 1, mask=m_ne, other=0.0).to(tl.float32)
            v_sw = tl.load(src + p_nw + W, mask=m_sw, other=0.0).to(tl.float32)
            v_se = tl.load(src + p_nw + W + 1, mask=m_se, other=0.0).to(tl.float32)
            gix += g * ((v_ne - v_nw) * by + (v_se - v_sw) * ay)
            giy += g * ((v_sw - v_nw) * bx + (v_se - v_ne) * ax)
        g_base += HW
        src += HW
        gsrc += HW
    if NEED_GEOM:
        # Clipping passes the gradient only strictly inside (grid_sample's border rule);
        # a 1-pixel-wide axis has no coordinate gradient at all in the reference.
        gx = tl.where((ix > 0.0) & (ix < (W - 1.0)), gix, 0.0)
        gy = tl.where((iy > 0.0) & (iy < (H - 1.0)), giy, 0.0)
        # (x, y) = K[:2] @ p  ->  dL/dp = K[:2]^T (gx, gy)
        gpx = k00 * gx + k10 * gy
        gpy = k01 * gx + k11 * gy
        gpz = k02 * gx + k12 * gy
        # p = m / z with z = max(mz, Z_MIN): dz only reaches mz where it was not clamped.
        gz = -(gpx * px + gpy * py + gpz * pz) / z
        gmx = gpx / z
        gmy = gpy / z
        gmz = gpz / z + tl.where(mz >= _Z_MIN, gz, 0.0)
        # m = R c + t
        gcx = t00 * gmx + t10 * gmy + t20 * gmz
        gcy = t01 * gmx + t11 * gmy + t21 * gmz
        gcz = t02 * gmx + t12 * gmy + t22 * gmz
        gd = rx * gcx + ry * gcy + rz * gcz
        tl.store(gdepth_ptr + b.to(tl.int64) * HW + offs, gd.to(gdepth_ptr.dtype.element_ty), mask=inb)
        # Lanes past the image loaded grad 0, so they add exactly 0 to the pose sums.
        part = gt_part_ptr + (b.to(tl.int64) * tl.num_programs(0) + pid) * 12
        tl.store(part + 0, tl.reduce(gmx * cx, 0, _add))
        tl.store(part + 1, tl.reduce(gmx * cy, 0, _add))
        tl.store(part + 2, tl.reduce(gmx * cz, 0, _add))
        tl.store(part + 3, tl.reduce(gmx, 0, _add))
        tl.store(part + 4, tl.reduce(gmy * cx, 0, _add))
        tl.store(part + 5, tl.reduce(gmy * cy, 0, _add))
        tl.store(part + 6, tl.reduce(gmy * cz, 0, _add))
        tl.store(part + 7, tl.reduce(gmy, 0, _add))
        tl.store(part + 8, tl.reduce(gmz * cx, 0, _add))
        tl.store(part + 9, tl.reduce(gmz * cy, 0, _add))
        tl.store(part + 10, tl.reduce(gmz * cz, 0, _add))
        tl.store(part + 11, tl.reduce(gmz, 0, _add))


# Kernels built with TRITON_INTERPRET=1 set at import run on CPU tensors (and only then).
INTERPRETED = not isinstance(inverse_warp_fwd_kernel, triton.runtime.JITFunction)


def inverse_warp_forward(
    src: torch.Tensor,
    depth: torch.Tensor,
    T: torch.Tensor,
    K: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block: int = BLOCK_FWD,
) -> torch.Tensor:
    """Launch the fused warp.

    Args:
        src: (B,C,H,W) floating, contiguous.
        depth: (B,1,H,W) floating, contiguous.
        T: (B,4,4) target->source transform, contiguous (read as fp32).
        K: (B,3,3) pixel intrinsics, contiguous (read as fp32).
        out: optional preallocated (B,C,H,W) result in src's dtype.
        block: pixels per program.

    Returns:
        (B,C,H,W) warped src, src's dtype.
    """
    b, c, h, w = src.shape
    out = torch.empty_like(src) if out is None else out
    if b * h * w > 0:
        grid = (triton.cdiv(h * w, block), b)
        inverse_warp_fwd_kernel[grid](src, depth, T, K, out, c, h, w, BLOCK=block)
    return out


def inverse_warp_backward(
    grad: torch.Tensor,
    src: torch.Tensor,
    depth: torch.Tensor,
    T: torch.Tensor,
    K: torch.Tensor,
    need_src: bool = True,
    need_geom: bool = True,
    *,
    gdepth_out: torch.Tensor | None = None,
    gt_part_out: torch.Tensor | None = None,
    block: int = BLOCK_BWD,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the warp; arguments as :func:`inverse_warp_forward` plus grad (B,C,H,W).

    Args:
        need_src / need_geom: skip the src scatter (the usual SDE case: the source frame is
            data) or the depth/pose chain.
        gdepth_out: optional preallocated (B,1,H,W) depth gradient in depth's dtype.
        gt_part_out: optional preallocated (B, n_blocks, 12) fp32 partial pose sums.

    Returns:
        grad_src (B,C,H,W) in src's dtype, grad_depth (B,1,H,W) in depth's dtype and grad_T
        (B,4,4) in T's dtype (bottom row 0); None for the ones not asked for.
    """
    b, c, h, w = src.shape
    n_blocks = triton.cdiv(h * w, block)
    # Atomic adds need a zeroed fp32 accumulator (bf16 atomics would round every add).
    gsrc = torch.zeros(src.shape, dtype=torch.float32, device=src.device) if need_src else None
    gdepth = gt_part = None
    if need_geom:
        gdepth = torch.empty_like(depth) if gdepth_out is None else gdepth_out
        gt_part = (
            torch.empty((b, n_blocks, T_GRAD_TERMS), dtype=torch.float32, device=src.device)
            if gt_part_out is None
            else gt_part_out
        )
    if (need_src or need_geom) and b * h * w > 0:
        dummy = grad
        inverse_warp_bwd_kernel[(n_blocks, b)](
            grad, src, depth, T, K,
            dummy if gsrc is None else gsrc, dummy if gdepth is None else gdepth,
            dummy if gt_part is None else gt_part, c, h, w,
            NEED_SRC=need_src, NEED_GEOM=need_geom, BLOCK=block,
        )  # fmt: skip
    grad_src = None if gsrc is None else gsrc.to(src.dtype)
    grad_t = None
    if need_geom:
        rows = gt_part.sum(1).view(b, 3, 4)
        grad_t = torch.cat([rows, rows.new_zeros(b, 1, 4)], 1).to(T.dtype)
    return grad_src, gdepth, grad_t
