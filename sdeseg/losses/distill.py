"""Depth distillation: a student imitates a teacher's disparity (the data-selection stage's
difficulty student, ``sdeseg/stages/select.py``)."""

from __future__ import annotations

import torch

from sdeseg.losses.common import LossOutput


def berhu(residual: torch.Tensor, mask: torch.Tensor | None = None, c_fraction: float = 0.2) -> torch.Tensor:
    """Reverse Huber (BerHu) loss, mean over the pixels where ``mask`` is True (all when None).

    ``|r|`` where ``|r| <= c`` and ``(r^2 + c^2) / (2c)`` above, with ``c = c_fraction ·
    max |r|`` over the kept pixels of the batch (detached; the official code's 0.2). 0 when
    nothing is kept or every residual is 0.
    """
    r = residual.float().abs()
    keep = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.expand_as(r)
    if not bool(keep.any()):
        return r.sum() * 0.0
    c = (c_fraction * r[keep].max()).detach()
    if float(c) == 0.0:
        return r[keep].mean()
    per_pixel = torch.where(r <= c, r, (r * r + c * c) / (2 * c))
    return per_pixel[keep].mean()


def disparity_distill_loss(student_disp: torch.Tensor, teacher_disp: torch.Tensor, keep: torch.Tensor,
                           c_fraction: float = 0.2) -> LossOutput:
    """Term ``distill/berhu``: :func:`berhu` of ``student - teacher`` disparities (B,1,H,W) on
    the ``keep`` pixels ((H,W) or broadcastable bool); stat ``distill/abs``: their mean |error|."""
    residual = student_disp.float() - teacher_disp.float()
    loss = berhu(residual, keep, c_fraction)
    k = keep.expand_as(residual)
    return LossOutput({"distill/berhu": loss}, {"distill/abs": residual.detach().abs()[k].mean()})
