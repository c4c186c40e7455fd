"""Triton kernels for the photometric error: 3x3 SSIM on reflection-padded inputs + L1.

Tiles: a program owns a ``BLOCK_H x BLOCK_W`` tile of one image (grid: column tiles, row
tiles, batch) and loops over channels, accumulating the channel means in registers. The
reflection padding is never materialised: the window's column indices are reflected once
per tile, its row indices once per window row, and the 9 taps of a pixel are mostly L1
hits of its neighbours' loads. Statistics are in fp32.

Backward, two kernels:
1. ``coef``: per pixel q and channel, the gradient of the loss w.r.t. the five window
   statistics (mu_x, mu_y, E[x^2] = E[y^2] share one, E[xy]), already divided by 9 (the
   pooling) — four fp32 maps.
2. ``grad``: per pixel r, the adjoint of "reflect-pad then 3x3 mean": sum the maps over
   the 3x3 neighbours q of r. Reflection folds the padded row -1 onto row 1 and row H onto
   row H-2, so neighbour q = r-1 counts twice when r = 1 and q = r+1 twice when r = H-2
   (same for columns). Then
   ``dx(r) = sum c_mx + 2 x(r) sum c_e + y(r) sum c_exy`` (+ L1 term), symmetric for y.
Recomputing the statistics of all 9 neighbours inside one kernel would need 81 taps per
pixel; the two-pass form streams 4 extra maps instead and keeps each kernel simple.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdeseg.ops.photometric_error.reference import SSIM_C1, SSIM_C2

# 8x32 tile, 4 warps: 2 pixels per thread. A row of 32 fp32 is one 128-byte line. ptxas for
# sm_90 reports 56 / 48 / 95 registers (fwd / coef / grad) and no spills; a 16x64 tile needs
# 228-255 registers, which would cap occupancy for these memory-bound kernels.
BLOCK_H = 8
BLOCK_W = 32
N_COEF = 4  # backward maps: d/dmu_x, d/dmu_y, d/dE[x^2] (= d/dE[y^2]), d/dE[xy]


# Kernels here use Triton builtins only (tl.full, not tl.zeros): see inverse_warp/kernel.py.
@triton.jit
def _reflect(i, n):
    """Index into the reflection-padded axis (pad 1, edge not repeated): -1 -> 1, n -> n-2."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _tile(H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    inb = (rows < H)[:, None] & (cols < W)[None, :]
    return rows, cols, inb


@triton.jit
def _row_taps(xp, yp, row, c_m, c_0, c_p, inb):
    """Sums of x, y, x^2, y^2, xy over the 3 taps of one window row (row: (BH,1) offsets)."""
    x0 = tl.load(xp + row + c_m, mask=inb, other=0.0).to(tl.float32)
    x1 = tl.load(xp + row + c_0, mask=inb, other=0.0).to(tl.float32)
    x2 = tl.load(xp + row + c_p, mask=inb, other=0.0).to(tl.float32)
    y0 = tl.load(yp + row + c_m, mask=inb, other=0.0).to(tl.float32)
    y1 = tl.load(yp + row + c_0, mask=inb, other=0.0).to(tl.float32)
    y2 = tl.load(yp + row + c_p, mask=inb, other=0.0).to(tl.float32)
    return (x0 + x1 + x2, y0 + y1 + y2, x0 * x0 + x1 * x1 + x2 * x2, y0 * y0 + y1 * y1 + y2 * y2,
            x0 * y0 + x1 * y1 + x2 * y2)  # fmt: skip


@triton.jit
def _window_stats(xp, yp, rows, H, W, c_m, c_0, c_p, inb, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """3x3 means mu_x, mu_y, E[x^2], E[y^2], E[xy] of the reflection-padded window."""
    s_x = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    s_y = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    s_xx = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    s_yy = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    s_xy = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    # A loop (not unrolled) over the window rows keeps 6 loads in flight instead of 18:
    # unrolled, a 16x64 tile needs 255 registers per thread and spills.
    for dy in range(-1, 2):
        row = (_reflect(rows + dy, H) * W)[:, None]
        a0, a1, a2, a3, a4 = _row_taps(xp, yp, row, c_m, c_0, c_p, inb)
        s_x += a0
        s_y += a1
        s_xx += a2
        s_yy += a3
        s_xy += a4
    return s_x / 9.0, s_y / 9.0, s_xx / 9.0, s_yy / 9.0, s_xy / 9.0


@triton.jit
def _ssim_terms(mu_x, mu_y, e_xx, e_yy, e_xy, C1: tl.constexpr, C2: tl.constexpr):
    """The four SSIM factors and the clamped dissimilarity, written as the reference does."""
    sigma_x = e_xx - mu_x * mu_x
    sigma_y = e_yy - mu_y * mu_y
    sigma_xy = e_xy - mu_x * mu_y
    a = 2.0 * mu_x * mu_y + C1
    bn = 2.0 * sigma_xy + C2
    dm = mu_x * mu_x + mu_y * mu_y + C1
    dv = sigma_x + sigma_y + C2
    raw = (1.0 - (a * bn) / (dm * dv)) / 2.0
    return a, bn, dm, dv, raw


@triton.jit
def _window_cols(cols, W):
    """Reflected column indices (1,BW) of the 3x3 window: left, centre, right."""
    return _reflect(cols - 1, W)[None, :], cols[None, :], _reflect(cols + 1, W)[None, :]


@triton.jit
def photometric_fwd_kernel(
    x_ptr, y_ptr, out_ptr, C, H, W, alpha, one_minus_alpha,
    C1: tl.constexpr, C2: tl.constexpr, HAS_SSIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """out[b, 0] = alpha * mean_c clamp((1 - SSIM_c)/2, 0, 1) + (1 - alpha) * mean_c |x_c - y_c|."""
    b = tl.program_id(2)
    HW = H * W
    rows, cols, inb = _tile(H, W, BLOCK_H, BLOCK_W)
    c_m, c_0, c_p = _window_cols(cols, W)
    r_0 = (rows * W)[:, None]
    xp = x_ptr + b.to(tl.int64) * C * HW
    yp = y_ptr + b.to(tl.int64) * C * HW
    l1 = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    ssim = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
    for _ in range(C):
        x = tl.load(xp + r_0 + c_0, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(yp + r_0 + c_0, mask=inb, other=0.0).to(tl.float32)
        l1 += tl.abs(x - y)
        if HAS_SSIM:
            mu_x, mu_y, e_xx, e_yy, e_xy = _window_stats(
                xp, yp, rows, H, W, c_m, c_0, c_p, inb, BLOCK_H, BLOCK_W
            )
            _a, _bn, _dm, _dv, raw = _ssim_terms(mu_x, mu_y, e_xx, e_yy, e_xy, C1, C2)
            ssim += tl.minimum(tl.maximum(raw, 0.0), 1.0)
        xp += HW
        yp += HW
    err = one_minus_alpha * (l1 / C)
    if HAS_SSIM:
        err = alpha * (ssim / C) + err
    tl.store(out_ptr + b.to(tl.int64) * HW + r_0 + c_0, err.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def photometric_coef_kernel(
    x_ptr, y_ptr, g_ptr, coef_ptr, C, H, W, alpha,
    C1: tl.constexpr, C2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """coef[b, c, k, q]: dLoss/d(window statistic k at pixel q) / 9, k = mu_x, mu_y, E[x^2]|E[y^2], E[xy]."""
    b = tl.program_id(2)
    HW = H * W
    rows, cols, inb = _tile(H, W, BLOCK_H, BLOCK_W)
    c_m, c_0, c_p = _window_cols(cols, W)
    r_0 = (rows * W)[:, None]
    centre = r_0 + c_0
    # alpha * mean over channels: each channel's SSIM gets alpha / C of the pixel's gradient.
    gs = tl.load(g_ptr + b.to(tl.int64) * HW + centre, mask=inb, other=0.0).to(tl.float32) * (alpha / C)
    xp = x_ptr + b.to(tl.int64) * C * HW
    yp = y_ptr + b.to(tl.int64) * C * HW
    cp = coef_ptr + b.to(tl.int64) * C * 4 * HW + centre
    for _ in range(C):
        mu_x, mu_y, e_xx, e_yy, e_xy = _window_stats(xp, yp, rows, H, W, c_m, c_0, c_p, inb, BLOCK_H, BLOCK_W)
        a, bn, dm, dv, raw = _ssim_terms(mu_x, mu_y, e_xx, e_yy, e_xy, C1, C2)
        den = dm * dv
        # clamp(raw, 0, 1) passes the gradient on the closed interval, as torch.clamp does.
        g = tl.where((raw >= 0.0) & (raw <= 1.0), gs, 0.0)
        g_num = -g / (2.0 * den)  # d raw / d num
        g_den = g * (a * bn) / (2.0 * den * den)  # d raw / d den
        c_mx = (g_num * 2.0 * mu_y * (bn - a) + g_den * 2.0 * mu_x * (dv - dm)) / 9.0
        c_my = (g_num * 2.0 * mu_x * (bn - a) + g_den * 2.0 * mu_y * (dv - dm)) / 9.0
        c_e = (g_den * dm) / 9.0
        c_exy = (g_num * 2.0 * a) / 9.0
        tl.store(cp, c_mx, mask=inb)
        tl.store(cp + HW, c_my, mask=inb)
        tl.store(cp + 2 * HW, c_e, mask=inb)
        tl.store(cp + 3 * HW, c_exy, mask=inb)
        xp += HW
        yp += HW
        cp += 4 * HW


@triton.jit
def _adjoint_row(cp, HW, row, c_m, c_0, c_p, wx_m, wx_p, m_m, m_0, m_p):
    """Column-weighted sums of the 4 coefficient maps over one row of the 3x3 neighbourhood."""
    s0 = (tl.load(cp + row + c_m, mask=m_m, other=0.0) * wx_m + tl.load(cp + row + c_0, mask=m_0, other=0.0)
          + tl.load(cp + row + c_p, mask=m_p, other=0.0) * wx_p)  # fmt: skip
    cp1 = cp + HW
    s1 = (tl.load(cp1 + row + c_m, mask=m_m, other=0.0) * wx_m + tl.load(cp1 + row + c_0, mask=m_0, other=0.0)
          + tl.load(cp1 + row + c_p, mask=m_p, other=0.0) * wx_p)  # fmt: skip
    cp2 = cp + 2 * HW
    s2 = (tl.load(cp2 + row + c_m, mask=m_m, other=0.0) * wx_m + tl.load(cp2 + row + c_0, mask=m_0, other=0.0)
          + tl.load(cp2 + row + c_p, mask=m_p, other=0.0) * wx_p)  # fmt: skip
    cp3 = cp + 3 * HW
    s3 = (tl.load(cp3 + row + c_m, mask=m_m, other=0.0) * wx_m + tl.load(cp3 + row + c_0, mask=m_0, other=0.0)
          + tl.load(cp3 + row + c_p, mask=m_p, other=0.0) * wx_p)  # fmt: skip
    return s0, s1, s2, s3


@triton.jit
def photometric_grad_kernel(
    x_ptr, y_ptr, g_ptr, coef_ptr, gx_ptr, gy_ptr, C, H, W, one_minus_alpha,
    HAS_SSIM: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """grad_x, grad_y at pixel r: adjoint 3x3 stencil over the coefficient maps + the L1 term.

    NEED_X / NEED_Y: store only the gradients asked for (in SDE the target frame is data)."""
    b = tl.program_id(2)
    HW = H * W
    rows, cols, inb = _tile(H, W, BLOCK_H, BLOCK_W)
    centre = (rows * W)[:, None] + cols[None, :]
    gl = tl.load(g_ptr + b.to(tl.int64) * HW + centre, mask=inb, other=0.0).to(tl.float32) * (
        one_minus_alpha / C
    )
    # Neighbour q = r + d exists when inside the image; it counts twice where reflection
    # folds the padded border onto r (see the module docstring).
    wx_m = tl.where(cols == 1, 2.0, 1.0)[None, :]
    wx_p = tl.where(cols == W - 2, 2.0, 1.0)[None, :]
    m_m = inb & (cols >= 1)[None, :]
    m_p = inb & (cols + 1 < W)[None, :]
    c_m = (cols - 1)[None, :]
    c_0 = cols[None, :]
    c_p = (cols + 1)[None, :]
    xp = x_ptr + b.to(tl.int64) * C * HW + centre
    yp = y_ptr + b.to(tl.int64) * C * HW + centre
    gxp = gx_ptr + b.to(tl.int64) * C * HW + centre
    gyp = gy_ptr + b.to(tl.int64) * C * HW + centre
    cp = coef_ptr + b.to(tl.int64) * C * 4 * HW
    for _ in range(C):
        x = tl.load(xp, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(yp, mask=inb, other=0.0).to(tl.float32)
        diff = x - y
        g_l1 = tl.where(diff > 0.0, gl, tl.where(diff < 0.0, -gl, 0.0))  # d|x-y|/dx = sign, 0 at 0
        gx = g_l1
        gy = -g_l1
        if HAS_SSIM:
            s_mx = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
            s_my = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
            s_e = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
            s_exy = tl.full([BLOCK_H, BLOCK_W], 0.0, tl.float32)
            # A loop (not unrolled) over the 3 neighbour rows keeps 12 loads in flight instead
            # of 36: unrolled, the kernel needs 255 registers and spills.
            for dy in range(-1, 2):
                nb = rows + dy
                ok = ((nb >= 0) & (nb < H))[:, None]
                fold = ((dy == -1) & (rows == 1)) | ((dy == 1) & (rows == H - 2))
                wy = tl.where(fold, 2.0, 1.0)[:, None]
                s0, s1, s2, s3 = _adjoint_row(cp, HW, (nb * W)[:, None], c_m, c_0, c_p, wx_m, wx_p,
                                              m_m & ok, inb & ok, m_p & ok)  # fmt: skip
                s_mx += wy * s0
                s_my += wy * s1
                s_e += wy * s2
                s_exy += wy * s3
            gx += s_mx + 2.0 * x * s_e + y * s_exy
            gy += s_my + 2.0 * y * s_e + x * s_exy
        if NEED_X:
            tl.store(gxp, gx.to(gx_ptr.dtype.element_ty), mask=inb)
        if NEED_Y:
            tl.store(gyp, gy.to(gy_ptr.dtype.element_ty), mask=inb)
        xp += HW
        yp += HW
        gxp += HW
        gyp += HW
        cp += 4 * HW


# Kernels built with TRITON_INTERPRET=1 set at import run on CPU tensors (and only then).
INTERPRETED = not isinstance(photometric_fwd_kernel, triton.runtime.JITFunction)


def _grid(b: int, h: int, w: int, block_h: int, block_w: int) -> tuple[int, int, int]:
    return (triton.cdiv(w, block_w), triton.cdiv(h, block_h), b)


def photometric_error_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    *,
    out: torch.Tensor | None = None,
    block_h: int = BLOCK_H,
    block_w: int = BLOCK_W,
) -> torch.Tensor:
    """Launch the fused photometric error.

    Args:
        pred, target: (B,C,H,W) floating, contiguous, same dtype, H and W >= 2.
        alpha: SSIM weight (0 skips the SSIM work, as the reference does).
        out: optional preallocated (B,1,H,W) result in pred's dtype.
        block_h, block_w: tile shape.

    Returns:
        (B,1,H,W) per-pixel error in pred's dtype.
    """
    b, c, h, w = pred.shape
    out = pred.new_empty((b, 1, h, w)) if out is None else out
    if b * h * w > 0:
        photometric_fwd_kernel[_grid(b, h, w, block_h, block_w)](
            pred, target, out, c, h, w, float(alpha), float(1.0 - alpha),
            C1=SSIM_C1, C2=SSIM_C2, HAS_SSIM=alpha != 0, BLOCK_H=block_h, BLOCK_W=block_w,
        )  # fmt: skip
    return out


def photometric_error_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    need_pred: bool = True,
    need_target: bool = True,
    *,
    coef_out: torch.Tensor | None = None,
    grad_pred_out: torch.Tensor | None = None,
    grad_target_out: torch.Tensor | None = None,
    block_h: int = BLOCK_H,
    block_w: int = BLOCK_W,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`photometric_error_forward` w.r.t. pred and target.

    Args:
        grad: (B,1,H,W) gradient of the error map, contiguous.
        pred, target, alpha: as in the forward.
        need_pred, need_target: which gradients to compute.
        coef_out: optional preallocated (B,C,4,H,W) fp32 scratch for the SSIM coefficients.
        grad_pred_out, grad_target_out: optional preallocated (B,C,H,W) results.
        block_h, block_w: tile shape.

    Returns:
        (grad_pred, grad_target), each (B,C,H,W) in pred's dtype, None where not asked for.
    """
    b, c, h, w = pred.shape
    gx = gy = None
    if need_pred:
        gx = torch.empty_like(pred) if grad_pred_out is None else grad_pred_out
    if need_target:
        gy = torch.empty_like(target) if grad_target_out is None else grad_target_out
    if b * c * h * w == 0 or not (need_pred or need_target):
        return gx, gy
    grid = _grid(b, h, w, block_h, block_w)
    has_ssim = alpha != 0
    if has_ssim:
        coef = pred.new_empty((b, c, N_COEF, h, w), dtype=torch.float32) if coef_out is None else coef_out
        photometric_coef_kernel[grid](
            pred, target, grad, coef, c, h, w, float(alpha),
            C1=SSIM_C1, C2=SSIM_C2, BLOCK_H=block_h, BLOCK_W=block_w,
        )  # fmt: skip
    else:
        coef = grad  # unused by the kernel when HAS_SSIM is False
    photometric_grad_kernel[grid](
        pred, target, grad, coef, grad if gx is None else gx, grad if gy is None else gy,
        c, h, w, float(1.0 - alpha),
        HAS_SSIM=has_ssim, NEED_X=need_pred, NEED_Y=need_target, BLOCK_H=block_h, BLOCK_W=block_w,
    )  # fmt: skip
    return gx, gy
