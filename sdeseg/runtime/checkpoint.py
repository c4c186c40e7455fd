"""Checkpoints that resume a run exactly; the stage only names its stateful parts.

A stage hands the runtime a :class:`TrainState`: the DeepSpeed engine, the parts that
are equal on every rank (``shared``: loop progress, EMA teacher) and each rank's own
parts (``per_rank``: reader positions, generators). A checkpoint directory holds

- the engine state under the DeepSpeed tag ``state`` (model, optimizer — sharded per
  rank under ZeRO — LR scheduler), with the shared parts in its ``client_state``
  (written once, by data-parallel rank 0);
- one ``rank_XXXXX.pt`` per rank: that rank's parts and its RNG states (Python, NumPy,
  torch CPU and every CUDA device), which the runtime adds on its own;
- one ``sha256_rank_XXXXX.json`` per rank: the sha256 of every file that rank wrote. DeepSpeed
  loads its files with pickle and checkpoints come back from a bucket, so before anything is
  loaded every file is checked against these hashes and a mismatch, or a file no rank wrote,
  is refused (:class:`CheckpointIntegrityError`).

Every rank writes into its own directory; Ray Train merges the ranks' uploads into one
checkpoint. Everything in a rank file loads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "state"
HASHES = "sha256_rank_{rank:05d}.json"


class CheckpointIntegrityError(ValueError):
    """A checkpoint's files do not match the sha256 manifest written with them."""


@dataclass
class Progress:
    """Where a stage's loop stands: optimizer steps done, best validation score, latest validation."""

    step: int = 0
    best: float = math.nan  # best validation score so far (the stage defines "better"); nan: none yet
    val: dict[str, Any] = field(default_factory=dict)

    def improved(self, score: float, higher_is_better: bool) -> bool:
        """Record ``score`` as the best when it beats the best so far (nan never does)."""
        if math.isnan(score):
            return False
        if math.isnan(self.best) or (score > self.best if higher_is_better else score < self.best):
            self.best = score
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.best, "val": dict(self.val)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best, self.val = int(state["step"]), float(state["best"]), dict(state["val"])


@dataclass
class TrainState:
    """The stateful parts of a stage (a torchtitan-style checkpoint contract).

    Args:
        engine: the DeepSpeed engine (model, optimizer, LR schedule).
        shared: parts equal on every rank, saved once: ``{"progress": Progress, "teacher": EMATeacher}``.
        per_rank: each rank's own parts: ``{"reader": ShardStream, "generator": torch.Generator}``.
            A ``None`` value is a part this run does not have (it is neither saved nor restored).

    A part is a ``torch.Generator`` or any object with ``state_dict()`` / ``load_state_dict()``.
    """

    engine: Any
    shared: dict[str, Any] = field(default_factory=dict)
    per_rank: dict[str, Any] = field(default_factory=dict)


def _part_state(part: Any) -> Any:
    return part.get_state() if isinstance(part, torch.Generator) else part.state_dict()


def _load_part(part: Any, state: Any) -> None:
    if isinstance(part, torch.Generator):
        part.set_state(state)
    else:
        part.load_state_dict(state)


def _parts_state(parts: dict[str, Any]) -> dict[str, Any]:
    return {name: _part_state(p) for name, p in parts.items() if p is not None}


def _load_parts(parts: dict[str, Any], saved: dict[str, Any], where: str) -> None:
    missing = sorted(name for name, p in parts.items() if p is not None and name not in saved)
    if missing:
        raise ValueError(f"{where} has no state for {missing} (saved: {sorted(saved)}): it was written by "
                         "another configuration of this stage")
    for name, p in parts.items():
        if p is not None:
            _load_part(p, saved[name])


def rng_state() -> dict[str, Any]:
    """RNG states of random, numpy, torch (CPU and every CUDA device), loadable with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "random": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_hashes(directory: Path, rank: int) -> None:
    """Hash every file under ``directory`` (all of them this rank's: each rank writes its own directory)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("sha256_rank_"))
    hashes = {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}
    tmp = directory / (HASHES.format(rank=rank) + ".tmp")
    tmp.write_text(json.dumps({"rank": rank, "sha256": hashes}, indent=1, sort_keys=True))
    tmp.replace(directory / HASHES.format(rank=rank))


def verify_checkpoint(directory: Path) -> int:
    """Check every file DeepSpeed or the runtime will load from ``directory`` against the
    ranks' sha256 manifests; returns the number of files checked. Raises
    :class:`CheckpointIntegrityError` naming the file on a mismatch, a file no manifest lists,
    or a checkpoint without manifests."""
    directory = Path(directory)
    manifests = sorted(directory.glob("sha256_rank_*.json"))
    if not manifests:
        raise CheckpointIntegrityError(f"checkpoint {directory} has no sha256 manifest (sha256_rank_*.json): "
                                       "refusing to load files that cannot be checked")
    expected: dict[str, str] = {}
    for m in manifests:
        try:
            expected.update(json.loads(m.read_text())["sha256"])
        except (ValueError, KeyError) as e:
            raise CheckpointIntegrityError(f"checkpoint {directory}: unreadable sha256 manifest {m.name} ({e})") from e
    loaded = [p for p in directory.rglob("*") if p.is_file()
              and (p.name.startswith("rank_") or p.relative_to(directory).parts[0] in (TAG, "latest"))]
    for p in sorted(loaded):
        rel = p.relative_to(directory).as_posix()
        if rel not in expected:
            raise CheckpointIntegrityError(f"checkpoint {directory}: {rel} is not in any sha256 manifest; refusing it")
    for rel, digest in sorted(expected.items()):
        p = directory / rel
        if not p.is_file():
            raise CheckpointIntegrityError(f"checkpoint {directory}: {rel} is listed in a sha256 manifest but missing")
        if file_sha256(p) != digest:
            raise CheckpointIntegrityError(f"checkpoint {directory}: {rel} does not match the sha256 written with it "
                                           "(modified or corrupt); refusing to load it")
    return len(expected)


def save_train_state(state: TrainState, directory: Path, rank: int) -> None:
    """Write this rank's part of a checkpoint of ``state`` into ``directory``, with its sha256 manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    state.engine.save_checkpoint(str(directory), tag=TAG, client_state={"sdeseg": _parts_state(state.shared)})
    rank_state = {"parts": _parts_state(state.per_rank), "rng": rng_state()}
    torch.save(rank_state, directory / f"rank_{rank:05d}.pt")
    write_hashes(directory, rank)


def load_train_state(state: TrainState, directory: Path, rank: int) -> None:
    """Check the checkpoint's hashes, then restore every part of ``state`` and this rank's RNG states."""
    rank_file = directory / f"rank_{rank:05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks (resuming with another "
            "number of workers is not supported)"
        )
    verify_checkpoint(directory)
    path, client = state.engine.load_checkpoint(str(directory), tag=TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {TAG!r} in {directory}")
    _load_parts(state.shared, client["sdeseg"], f"checkpoint {directory}")
    saved = torch.load(rank_file, weights_only=True)
    _load_parts(state.per_rank, saved["parts"], str(rank_file))
    set_rng_state(saved["rng"])


class LocalCheckpoints:
    """Checkpoints of in-process runs under ``<run_dir>/checkpoints/ckpt_XXXXXX``.

    Written under a temporary name, marked ``COMPLETE`` and renamed, so a run killed while
    saving resumes from the previous one; the newest ``keep`` are kept.
    """

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("ckpt_*") if (p / "COMPLETE").exists())
        return done[-1] if done else None

    def save(self, state: TrainState, step: int, rank: int) -> Path:
        final = self.root / f"ckpt_{step:06d}"
        tmp = self.root / f".tmp_ckpt_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_train_state(state, tmp, rank)
        (tmp / "COMPLETE").touch()
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in self.root.glob("ckpt_*") if p != final)[: -self.keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
        return final
