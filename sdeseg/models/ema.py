"""Mean teacher: an exponential moving average of the student's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def ema_alpha(step: int, alpha_max: float) -> float:
    """``min(1 - 1/(step+1), alpha_max)``: a true running mean for the first steps (the
    teacher is the student at step 0), an exponential average once that is more stable."""
    return min(1.0 - 1.0 / (step + 1), alpha_max)


class EMATeacher:
    """Teacher whose parameters follow ``alpha * teacher + (1 - alpha) * student``.

    Buffers (BatchNorm running statistics, counters) are copied from the student, not
    averaged. The teacher stays in eval mode (running statistics, no dropout) and never
    needs gradients; it is not an ``nn.Module`` attribute of anything, so it is outside
    the optimizer and the engine. Call it like the model: ``teacher(images)`` runs under
    ``torch.no_grad()``.

    Args:
        student: the model to follow (an unwrapped ``nn.Module``; pass ``engine.module``).
        alpha_max: upper bound of the EMA coefficient (``semiseg.ema_alpha_max``).
    """

    def __init__(self, student: nn.Module, alpha_max: float = 0.99) -> None:
        if not 0.0 <= alpha_max < 1.0:
            raise ValueError(f"alpha_max must be in [0, 1), got {alpha_max}")
        self.alpha_max = alpha_max
        self.model = copy.deepcopy(student)
        self.model.eval()
        self.model.requires_grad_(False)
        self.updates = 0  # calls of update(): one per optimizer step in the stages

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Move the teacher towards ``student`` after optimizer step ``step`` (0-based).

        Returns the alpha used.
        """
        alpha = ema_alpha(step, self.alpha_max)
        t_params = dict(self.model.named_parameters())
        for name, p in student.named_parameters():
            t_params[name].mul_(alpha).add_(p.detach().to(t_params[name].device), alpha=1.0 - alpha)
        t_bufs = dict(self.model.named_buffers())
        for name, b in student.named_buffers():
            t_bufs[name].copy_(b)
        self.updates += 1
        return alpha

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def to(self, device: torch.device | str) -> EMATeacher:
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "alpha_max": self.alpha_max, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.alpha_max = float(state.get("alpha_max", self.alpha_max))
        self.updates = int(state.get("updates", 0))
