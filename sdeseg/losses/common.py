"""What every loss returns."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class LossOutput(NamedTuple):
    """``terms``: weighted scalar loss terms, keyed ``<task>/<term>`` (a stage sums the ones it
    trains on); ``stats``: detached diagnostics, never summed into a loss."""

    terms: dict[str, torch.Tensor]
    stats: dict[Any, torch.Tensor]
