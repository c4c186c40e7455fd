"""Shared fixtures: a tiny synthetic dataset (generated once per session) and tiny configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = [
    "data.size=32x64", "data.batch_size=2", "data.labeled_batch_size=2", "data.val_batch_size=4",
    "data.num_workers=0", "data.shuffle_buffer=8",
    "model.width=16", "model.pose_width=16", "model.decoder_channels=[8,8,16,16,32]",
    "train.log_every=1", "train.val_every=0", "runtime.in_process=true", "runtime.num_workers=1",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """24 training triplets + 8 validation + 8 test samples at 32x64 (the splits' scenes differ)."""
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "city"
    generate(str(root), num_train=24, num_val=8, num_test=8, size=(32, 64), seed=3, procs=1, shard_size=6,
             progress=False)
    return str(root)


def tiny_config(preset: str, root: str, *overrides: str):
    from sdeseg.config import load_config

    return load_config(preset, [f"data.root={root}", *TINY, *overrides])
