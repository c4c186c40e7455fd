"""Figures and tables of data-selection runs (``sdeseg/stages/select.py``): which images each
method chose, and how each chosen set's class-pixel shares compare with the whole split's.

``python -m tune.selection_report`` puts several runs side by side; the functions here read
only a run's ``selection/`` files and the dataset's shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdeseg.data.classes import class_names, colorize


def read_keyfile(run_dir: str | Path, budget: int) -> dict:
    """A selection run's ``selection/labeled_keys_<budget>.json``."""
    path = Path(run_dir) / "selection" / f"labeled_keys_{budget}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (budgets of that run: "
                                f"{sorted(p.stem.split('_')[-1] for p in path.parent.glob('labeled_keys_*.json'))})")
    return json.loads(path.read_text())


def class_shares(run_dir: str | Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(share of each class among the labeled pixels of ``keys``, the same over every candidate),
    from the run's round-0 scores (``selection/scores_round0.pt``)."""
    scores = torch.load(Path(run_dir) / "selection" / "scores_round0.pt", weights_only=True)
    row = {k: i for i, k in enumerate(scores["keys"])}
    missing = [k for k in keys if k not in row]
    if missing:
        raise KeyError(f"{len(missing)} key(s) are not candidates of {run_dir}, e.g. {missing[0]!r}")
    pixels = scores["class_pixels"].double()
    chosen = pixels[[row[k] for k in keys]].sum(0)
    pool = pixels.sum(0)
    return (chosen / chosen.sum().clamp(min=1)).numpy(), (pool / pool.sum().clamp(min=1)).numpy()


def load_images(data_root: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (RGB image (H,W,3) float in [0,1], colourised label (H,W,3) uint8), full size."""
    from sdeseg.data.labeled import LabeledPool

    pool = LabeledPool(data_root, keys, batch_size=len(keys), crop=None, augment=None, seed=0)
    batch = next(iter(pool))
    return {k: (batch.images[0][i].permute(1, 2, 0).clamp(0, 1).numpy(), colorize(batch.label[i].numpy()))
            for i, k in enumerate(batch.keys)}


def selection_figure(runs: dict[str, str | Path], data_root: str, budget: int, path: str | Path,
                     columns: int = 8) -> Path:
    """One PNG: per method (a row pair), the first ``columns`` chosen images and their labels;
    below, each set's class-pixel shares next to the whole split's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {name: read_keyfile(run, budget)["keys"] for name, run in runs.items()}
    images = load_images(data_root, sorted({k for keys in sets.values() for k in keys[:columns]}))
    n = len(sets)
    fig = plt.figure(figsize=(1.9 * columns, 2.1 * n + 3.2))
    grid = fig.add_gridspec(2 * n + 1, columns, height_ratios=[1] * (2 * n) + [2.6])
    for r, (name, keys) in enumerate(sets.items()):
        for c in range(columns):
            for half, what in ((0, 0), (1, 1)):
                ax = fig.add_subplot(grid[2 * r + half, c])
                ax.axis("off")
                if c < len(keys):
                    ax.imshow(images[keys[c]][what])
                if c == 0 and half == 0:
                    ax.set_title(f"{name}: first {min(columns, len(keys))} of {len(keys)}", loc="left", fontsize=9)
    ax = fig.add_subplot(grid[2 * n, :])
    names = class_names()
    x = np.arange(len(names))
    pool = None
    width = 0.8 / (n + 1)
    for i, (name, keys) in enumerate(sets.items()):
        share, pool = class_shares(runs[name], keys)
        ax.bar(x + (i + 1) * width, share, width, label=f"{name} ({int((share > 0).sum())} classes)")
    ax.bar(x, pool, width, color="black", label="whole split")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 1)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of labeled pixels")
    ax.legend(fontsize=8, ncol=min(n + 1, 4))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
