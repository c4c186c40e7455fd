"""Checkpoints that resume a run exactly.

A checkpoint directory holds the DeepSpeed engine state under the tag ``state``
(model, optimizer — sharded per rank under ZeRO — LR scheduler, step), a global
``client_state`` (step, EMA teacher, ...) inside it, and one ``rank_XXXXX.pt`` per
rank with that rank's reader position and RNG states. Every rank writes into its
own directory; Ray Train merges the ranks' uploads into one checkpoint.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "state"


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and random as tensors/lists (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "random": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss"]))


def save_engine_checkpoint(engine, directory: Path, client_state: dict, rank: int, rank_state: dict) -> None:
    """Write this rank's part of a checkpoint into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"sdeseg": client_state})
    torch.save(rank_state, directory / f"rank_{rank:05d}.pt")


def load_engine_checkpoint(engine, directory: Path, rank: int) -> tuple[dict, dict]:
    """Restore the engine from ``directory``; return (client_state, this rank's state)."""
    path, client = engine.load_checkpoint(str(directory), tag=TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {TAG!r} in {directory}")
    rank_file = directory / f"rank_{rank:05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks (resuming with another "
            "number of workers is not supported)"
        )
    return client["sdeseg"], torch.load(rank_file, weights_only=True)


class LocalCheckpoints:
    """Checkpoints of in-process runs under ``<run_dir>/checkpoints/ckpt_XXXXXX``."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("ckpt_*") if (p / "COMPLETE").exists())
        return done[-1] if done else None

    def save(self, engine, step: int, client_state: dict, rank: int, rank_state: dict) -> Path:
        final = self.root / f"ckpt_{step:06d}"
        tmp = self.root / f".tmp_ckpt_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_engine_checkpoint(engine, tmp, client_state, rank, rank_state)
        (tmp / "COMPLETE").touch()
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in self.root.glob("ckpt_*") if p != final)[: -self.keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
        return final
