"""The 19 Cityscapes train classes, from the official tables in ``cityscapesscripts``.

Instance maps follow the Cityscapes ``gtFine_instanceIds`` convention: a pixel of a thing
instance holds ``label id * INSTANCE_DIVISOR + index`` (index 0, 1, ... per class and image),
every other pixel its plain *label id* (not train id) -- stuff, void, and thing regions
without an instance (Cityscapes' groups, e.g. ``cargroup`` pixels hold 26).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

IGNORE_INDEX = 255
INSTANCE_DIVISOR = 1000  # Cityscapes instanceIds: label id * 1000 + index


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
    # train id -> label id; 255 (ignore) -> 0 ("unlabeled")
    to_label = np.zeros(256, dtype=np.uint8)
    for lab in labels:
        if 0 <= lab.trainId < IGNORE_INDEX:
            to_label[lab.trainId] = lab.id
    things = tuple(sorted(lab.trainId for lab in labels if lab.hasInstances and 0 <= lab.trainId < IGNORE_INDEX))
    instance_ids = np.array(sorted(lab.id for lab in labels if lab.hasInstances), dtype=np.int64)
    return names, colors, lut, valid_ids, to_label, things, instance_ids


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


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map train ids (0..18) to their official label ids (e.g. car 13 -> 26); 255 -> 0 (unlabeled)."""
    return _tables()[4][train_ids]


def thing_train_ids() -> tuple[int, ...]:
    """Train ids of the classes with instances: person, rider, car, truck, bus, train,
    motorcycle, bicycle (11..18)."""
    return _tables()[5]


def instance_label_ids() -> np.ndarray:
    """Label ids of every class with instances in the official tables, including caravan and
    trailer, which have no train id (24..33)."""
    return _tables()[6]


def instance_ids_to_label_ids(instance_ids: np.ndarray) -> np.ndarray:
    """(H,W) Cityscapes instanceIds -> (H,W) label ids (``id // 1000`` on instance pixels)."""
    ids = np.asarray(instance_ids).astype(np.int64)
    return np.where(ids >= INSTANCE_DIVISOR, ids // INSTANCE_DIVISOR, ids)


def instance_ids_to_train_ids(instance_ids: np.ndarray) -> np.ndarray:
    """(H,W) Cityscapes instanceIds -> (H,W) uint8 train ids (255 = ignore)."""
    return label_ids_to_train_ids(instance_ids_to_label_ids(instance_ids))


def colorize(label: np.ndarray) -> np.ndarray:
    """(H,W) train ids -> (H,W,3) uint8 palette image; ignore is black."""
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = label < len(class_names())
    out[valid] = class_colors()[label[valid]]
    return out
