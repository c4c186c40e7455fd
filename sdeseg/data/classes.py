"""The 19 Cityscapes train classes, from the official tables in ``cityscapesscripts``."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

IGNORE_INDEX = 255


@lru_cache(maxsize=1)
def _tables():
    from cityscapesscripts.helpers.labels import labels

    train = sorted((lab.trainId, lab.name, lab.color) for lab in labels if 0 <= lab.trainId < IGNORE_INDEX)
    names = tuple(name for _, name, _ in train)
    colors = np.array([color for _, _, color in train], dtype=np.uint8)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256 and 0 <= lab.trainId < IGNORE_INDEX:
            lut[lab.id] = lab.trainId
    valid_ids = np.array(sorted(lab.id for lab in labels if lab.id >= 0), dtype=np.int64)
    return names, colors, lut, valid_ids


def class_names() -> tuple[str, ...]:
    """Names of train ids 0..18 (road, sidewalk, ..., bicycle)."""
    return _tables()[0]


def class_colors() -> np.ndarray:
    """(19, 3) uint8 official palette of the train classes."""
    return _tables()[1]


def train_id(name: str) -> int:
    """Train id of a class name, e.g. ``train_id("car") == 13``."""
    return class_names().index(name)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map official Cityscapes label ids (gtFine_labelIds) to train ids; others -> 255."""
    return _tables()[2][label_ids]


def known_label_ids() -> np.ndarray:
    """All label ids defined by the official tables (0..33)."""
    return _tables()[3]


def colorize(label: np.ndarray) -> np.ndarray:
    """(H,W) train ids -> (H,W,3) uint8 palette image; ignore is black."""
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = label < len(class_names())
    out[valid] = class_colors()[label[valid]]
    return out
