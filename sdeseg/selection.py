"""Automatic data selection: which images to label, from self-supervised depth (pure torch).

The paper's third contribution (Hoyer et al., "Three Ways...", sec. 3.4): with no human in
the loop, pick images that are *diverse* (far apart in the frozen SDE teacher's decoder
features) and *difficult* (a depth student trained on the images chosen so far imitates the
teacher badly there, a proxy for segmentation difficulty). The greedy step is an iterative
farthest-point sampling whose distances are raised by the difficulty term. The stage
(``sdeseg/stages/select.py``) runs these functions over rounds of growing label budgets;
constants are the official code's (``../shared/METHODS.md``, "Automatic data selection").

Nothing here imports ray, deepspeed or torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Pick:
    """One greedy pick: candidate ``index``, its ``diversity`` term (distance to the nearest
    image already chosen) and its ``difficulty`` term (difficulty_weight × difficulty)."""

    index: int
    diversity: float
    difficulty: float


def _check_selected(selected: Sequence[int], budget: int, n: int) -> list[int]:
    chosen = [int(i) for i in selected]
    if not chosen:
        raise ValueError("selected must hold at least one index (the seed of the farthest-point sampling)")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"selected repeats an index: {chosen}")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"selected indices {bad} are outside [0, {n})")
    if budget < len(chosen):
        raise ValueError(f"budget {budget} is smaller than the {len(chosen)} images already selected")
    if budget > n:
        raise ValueError(f"budget {budget} is larger than the {n} candidates")
    return chosen


def greedy_picks(
    features: torch.Tensor,
    difficulty: torch.Tensor | None,
    selected: Sequence[int],
    budget: int,
    difficulty_weight: float,
) -> list[Pick]:
    """The picks :func:`farthest_point_selection` adds to ``selected``, with their two terms.

    Distances are computed in float64, so ties are decided by the smallest index, not by
    rounding. Cost: O((budget - len(selected)) · N · D).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    chosen = _check_selected(selected, budget, n)
    f = features.detach().to(torch.float64)
    if difficulty is None:
        bonus = torch.zeros(n, dtype=torch.float64, device=f.device)
    else:
        if difficulty.shape != (n,):
            raise ValueError(f"difficulty must be (N,) = ({n},), got shape {tuple(difficulty.shape)}")
        bonus = difficulty_weight * difficulty.detach().to(torch.float64, copy=True).to(f.device)
    nearest = torch.full((n,), math.inf, dtype=torch.float64, device=f.device)
    for i in chosen:
        nearest = torch.minimum(nearest, (f - f[i]).norm(dim=1))
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    taken[chosen] = True
    picks: list[Pick] = []
    while len(chosen) + len(picks) < budget:
        score = torch.where(taken, torch.full_like(nearest, -math.inf), nearest + bonus)
        j = int(torch.argmax(score))  # the first maximum: ties go to the smallest index
        picks.append(Pick(j, float(nearest[j]), float(bonus[j])))
        taken[j] = True
        nearest = torch.minimum(nearest, (f - f[j]).norm(dim=1))
    return picks


def farthest_point_selection(
    features: torch.Tensor,
    difficulty: torch.Tensor | None,
    selected: Sequence[int],
    budget: int,
    difficulty_weight: float,
) -> list[int]:
    """Greedy diversity + difficulty selection (the official ``label_selection.py`` step).

    Args:
        features: (N, D) float, one row per candidate (:func:`standardise_features`).
        difficulty: (N,) float or None (= zeros): per-candidate difficulty (:func:`depth_difficulty`).
        selected: non-empty list of indices already chosen.
        budget: size of the returned list (``>= len(selected)``, ``<= N``).
        difficulty_weight: the official code's 1000.

    While fewer than ``budget`` are chosen, adds the unchosen j maximising
    ``min_{i in chosen} ||features[i] - features[j]||_2 + difficulty_weight * difficulty[j]``
    (ties: smallest j). With ``difficulty_weight=0`` every pick is the point farthest from
    the chosen set.

    Returns:
        the chosen indices in order, starting with ``selected``.
    """
    picks = greedy_picks(features, difficulty, selected, budget, difficulty_weight)
    return [int(i) for i in selected] + [p.index for p in picks]


def top_scores(score: torch.Tensor, selected: Sequence[int], budget: int) -> list[int]:
    """``selected`` grown to ``budget`` by the unchosen candidates of highest ``score`` (N,)
    (ties: smallest index): the entropy and difficulty-only baselines."""
    n = score.shape[0]
    chosen = [int(i) for i in selected]
    if budget < len(chosen) or budget > n:
        raise ValueError(f"budget {budget} must be in [{len(chosen)}, {n}]")
    s = score.detach().to(torch.float64).clone()
    s[chosen] = -math.inf
    order = sorted(range(n), key=lambda j: (-float(s[j]), j))
    return chosen + order[: budget - len(chosen)]


def pool_features(features: torch.Tensor, size: tuple[int, int] = (4, 8)) -> torch.Tensor:
    """(B, C, h, w) decoder activations -> (B, C, size[0], size[1]) by adaptive average pooling."""
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
    return F.adaptive_avg_pool2d(features.float(), size)


def standardise_features(pooled: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, C, a, b) pooled features of all candidates -> (N, C·a·b): each channel standardised
    to mean 0 and standard deviation 1 over all candidates and positions, then flattened."""
    if pooled.dim() != 4:
        raise ValueError(f"pooled features must be (N, C, a, b), got shape {tuple(pooled.shape)}")
    x = pooled.to(torch.float64)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return ((x - mean) / (std + eps)).flatten(1).to(torch.float32)


def normalise_disparity(disp: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) disparity -> the same shape, min-max normalised per image to
    [0, 1] (the teacher's pseudo-label in the official code)."""
    flat = disp.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (disp.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (disp.dim() - 1)))
    return (disp - lo) / (hi - lo).clamp(min=eps)


def bottom_rows_mask(height: int, width: int, fraction: float, device=None) -> torch.Tensor:
    """(H, W) bool: False on the bottom ``round(fraction · H)`` rows (the ego car), True elsewhere."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    cut = int(round(fraction * height))
    if cut:
        mask[height - cut:] = False
    return mask


def depth_difficulty(
    student_disp: torch.Tensor,
    teacher_disp: torch.Tensor,
    far_disp: float = 0.07,
    far_dilate: int = 7,
    ignore_bottom: float = 0.13,
) -> torch.Tensor:
    """Per-image depth difficulty: how badly the student imitates the teacher.

    Args:
        student_disp: (B, 1, H, W) or (B, H, W) student disparity in [0, 1].
        teacher_disp: same shape, the teacher's disparity normalised per image
            (:func:`normalise_disparity`).
        far_disp: teacher disparities below this are far (sky, or a moving car's
            artefacts): the error is zeroed there, on the region dilated by a
            ``far_dilate`` × ``far_dilate`` window.
        ignore_bottom: fraction of bottom rows zeroed (the ego car).

    Returns:
        (B,) mean over all pixels of ``|log(1 + d_student) - log(1 + p_teacher)|`` with the
        masked pixels counted as 0 (the official code's e_j).
    """
    if student_disp.shape != teacher_disp.shape:
        raise ValueError(f"student {tuple(student_disp.shape)} and teacher {tuple(teacher_disp.shape)} "
                         "disparities differ in shape")
    s = student_disp.float().reshape(-1, 1, *student_disp.shape[-2:])
    t = teacher_disp.float().reshape(-1, 1, *teacher_disp.shape[-2:])
    err = (torch.log1p(s) - torch.log1p(t)).abs()
    far = (t < far_disp).float()
    if far_dilate > 1:
        far = F.max_pool2d(far, far_dilate, stride=1, padding=far_dilate // 2)[..., : t.shape[-2], : t.shape[-1]]
    keep = (far == 0) & bottom_rows_mask(t.shape[-2], t.shape[-1], ignore_bottom, t.device)
    return (err * keep).flatten(1).mean(dim=1)


def normalised_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, H, W) class probabilities -> (B,) mean over pixels of ``-sum_c p log p / log C``
    (in [0, 1]; the entropy active-learning baseline's score)."""
    c = probs.shape[1]
    p = probs.float()
    ent = -(p * torch.log(p.clamp(min=eps))).sum(dim=1) / math.log(c)
    return ent.flatten(1).mean(dim=1)
