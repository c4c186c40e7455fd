"""The embedded procedural dataset: determinism, exact geometry, labels, shards and CLI."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.synthetic import generate, render_sample, sample_key
from sdeseg.data.classes import IGNORE_INDEX, class_names
from sdeseg.data.codec import decode_sample
from sdeseg.ops import inverse_warp, photometric_error
from sdeseg.ops.inverse_warp.reference import project_coords

SKY = class_names().index("sky")
ROAD = class_names().index("road")


def _arrays(s: dict) -> list[np.ndarray]:
    return [s["frames"][k] for k in (-1, 0, 1)] + [s["label"], s["depth"], s["K"], s["T_prev"], s["T_next"]]


def test_sample_contract():
    h, w = 40, 72
    s = render_sample(0, "train", (h, w), "city", 0)
    for k in (-1, 0, 1):
        assert s["frames"][k].shape == (h, w, 3) and s["frames"][k].dtype == np.uint8
    assert s["label"].shape == (h, w) and s["label"].dtype == np.uint8
    assert s["depth"].shape == (h, w) and s["depth"].dtype == np.float32
    assert s["static"].shape == (h, w) and s["static"].dtype == bool
    K = s["K"]
    assert K[0, 0] == K[1, 1] and 1.0 * w < K[0, 0] < 1.2 * w  # Cityscapes-like field of view
    assert abs(K[0, 2] - (w - 1) / 2) <= 0.011 * w and abs(K[1, 2] - (h - 1) / 2) <= 0.011 * h
    for name in ("T_prev", "T_next"):
        T = s[name]
        assert np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-9) and np.allclose(T[3], (0, 0, 0, 1))
        assert 0.4 - 1e-6 <= np.linalg.norm(T[:3, 3]) <= 1.5 + 0.05  # metres per frame
        angle = np.degrees(np.arccos(np.clip((np.trace(T[:3, :3]) - 1) / 2, -1, 1)))
        assert angle < 3.0
    # t-1 is behind the camera of frame t, t+1 in front of it (z forward)
    assert s["T_prev"][2, 3] > 0 > s["T_next"][2, 3]


def test_deterministic_and_seeded():
    a = render_sample(3, "train", (32, 64), "city", 0)
    b = render_sample(3, "train", (32, 64), "city", 0)
    for x, y in zip(_arrays(a), _arrays(b)):
        np.testing.assert_array_equal(x, y)
    for other in (
        render_sample(3, "train", (32, 64), "city", 1),
        render_sample(3, "val", (32, 64), "city", 0),
        render_sample(3, "test", (32, 64), "city", 0),
    ):
        assert not np.array_equal(a["frames"][0], other["frames"][0])
        assert not np.array_equal(a["depth"], other["depth"])


def test_depth_is_z_along_pixel_centre_rays():
    """Road pixels lifted with depth * K^-1 [u, v, 1] land exactly on the road plane Y = 0.

    This pins the conventions independently of the warp: a half-pixel offset between the
    rendered rays and K, or ray length instead of z, moves these points by centimetres.
    """
    s = render_sample(1, "train", (48, 96), "city", 0)
    h, w = s["depth"].shape
    v, u = np.nonzero(s["label"] == ROAD)
    assert len(v) > 100
    d = s["depth"][v, u].astype(np.float64)
    cam = (np.linalg.inv(s["K"]) @ np.stack([u, v, np.ones_like(u)]).astype(np.float64)) * d
    world = s["info"]["world_from_camera"] @ np.vstack([cam, np.ones(len(d))])
    # float32 depth: relative precision ~1e-7 of up to a few hundred metres
    assert np.abs(world[1]).max() < 1e-4


def _warp_ratio(s: dict) -> float:
    """Mean photometric error after warping t-1, t+1 into t with the ground truth, over that before."""
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255  # noqa: E731
    cur = to_t(s["frames"][0])
    depth = torch.from_numpy(s["depth"])[None, None].double()
    K = torch.from_numpy(s["K"])[None]
    h, w = s["depth"].shape
    warped_err, plain_err = [], []
    for k, name in ((-1, "T_prev"), (1, "T_next")):
        T = torch.from_numpy(s[name])[None]
        src = to_t(s["frames"][k])
        coords = project_coords(depth, T, K)[0]
        in_view = (coords[0] >= 0) & (coords[0] <= w - 1) & (coords[1] >= 0) & (coords[1] <= h - 1)
        mask = in_view & torch.from_numpy(s["static"]) & (depth[0, 0] > 0)
        assert mask.float().mean() > 0.2
        warped = inverse_warp(src, depth, T, K)
        warped_err.append(photometric_error(warped, cur)[0, 0][mask].mean().item())
        plain_err.append(photometric_error(src, cur)[0, 0][mask].mean().item())
    return float(np.mean(warped_err) / np.mean(plain_err))


@pytest.mark.parametrize("seed, index", [(0, 0), (1, 1), (2, 2)])
def test_ground_truth_warps_neighbours_onto_frame_t(seed, index):
    """Depth, K and T agree: inverse_warp with the ground truth reconstructs frame t."""
    s = render_sample(index, "train", (96, 192), "city", seed)
    ratio = _warp_ratio(s)
    # what remains is occlusion boundaries and disocclusions behind moving objects
    assert ratio <= 1 / 3, ratio


def test_labels_depth_and_static_mask():
    present = set()
    moving_seen = False
    for i in range(8):
        s = render_sample(i, "train", (64, 128), "city", 0)
        label, depth = s["label"], s["depth"]
        values = set(np.unique(label).tolist())
        assert values <= set(range(len(class_names()))) | {IGNORE_INDEX}
        present |= values
        np.testing.assert_array_equal(depth == 0, label == SKY)
        assert np.all(depth >= 0) and np.all(np.isfinite(depth))
        assert not s["static"][label == SKY].any()
        moving_seen |= bool((~s["static"] & (label != SKY)).any())
    assert len(present - {IGNORE_INDEX}) >= 10, sorted(present)
    for thin in ("pole", "traffic sign", "person", "car", "building", "vegetation"):
        assert class_names().index(thin) in present, thin
    assert moving_seen, "no moving object in 8 samples"


def _read_shard(path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return [decode_sample(m) for m in samples.values()]


def _chroma(frames: list[np.ndarray]) -> float:
    x = np.stack(frames).astype(np.float64)
    return float((x.max(-1) - x.min(-1)).mean())


def test_generate_shards_resume_and_cli(tmp_path, capsys):
    out = tmp_path / "city"
    report = generate(
        str(out),
        num_train=2,
        num_val=2,
        num_test=3,
        size=(32, 64),
        style="city",
        seed=0,
        procs=1,
        shard_size=2,
        progress=False,
    )
    assert report["samples"] == 7 and report["shards"] == 4 and report["shards_converted_this_run"] == 4
    assert report["samples_per_split"] == {"synth-city/test": 3, "synth-city/train": 2, "synth-city/val": 2}
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(
        [sample_key("city", split, 0, i) for split, n in (("train", 2), ("val", 2), ("test", 3)) for i in range(n)]
    )
    assert {r["domain"] for r in rows} == {"synth-city"} and all(r["has_label"] for r in rows)
    assert {(r["height"], r["width"]) for r in rows} == {(32, 64)}

    # the stored sample is exactly what render_sample gives (PNG is lossless)
    row = next(r for r in rows if r["key"] == sample_key("city", "val", 0, 1))
    stored = next(s for s in _read_shard(out / row["shard"]) if s["key"] == row["key"])
    ref = render_sample(1, "val", (32, 64), "city", 0)
    for k in (-1, 0, 1):
        np.testing.assert_array_equal(stored["frames"][k], ref["frames"][k])
    np.testing.assert_array_equal(stored["label"], ref["label"])
    np.testing.assert_array_equal(stored["depth"], ref["depth"])
    meta = stored["meta"]
    np.testing.assert_allclose(meta["K"], ref["K"])
    np.testing.assert_allclose(meta["T_prev"], ref["T_prev"])
    np.testing.assert_allclose(meta["T_next"], ref["T_next"])
    assert (meta["domain"], meta["split"], meta["style"], meta["seed"], meta["index"]) == (
        "synth-city",
        "val",
        "city",
        0,
        1,
    )

    # the held-out test split: its own scenes, none shared with val (or train)
    stored_by_split: dict[str, list[dict]] = {}
    for shard in sorted({r["shard"] for r in rows}):
        for sample in _read_shard(out / shard):
            stored_by_split.setdefault(sample["meta"]["split"], []).append(sample)
    assert {k: len(v) for k, v in stored_by_split.items()} == {"train": 2, "val": 2, "test": 3}
    for t in stored_by_split["test"]:
        assert t["key"].startswith("synth-city/test/")
        for other in stored_by_split["val"] + stored_by_split["train"]:
            assert not np.array_equal(t["frames"][0], other["frames"][0])
            assert not np.array_equal(t["depth"], other["depth"])
    test_1 = next(t for t in stored_by_split["test"] if t["meta"]["index"] == 1)
    np.testing.assert_array_equal(test_1["frames"][0], render_sample(1, "test", (32, 64), "city", 0)["frames"][0])

    again = generate(
        str(out),
        num_train=2,
        num_val=2,
        num_test=3,
        size=(32, 64),
        style="city",
        seed=0,
        procs=1,
        shard_size=2,
        progress=False,
    )
    assert again["shards_converted_this_run"] == 0 and again["samples"] == 7

    from sdeseg.cli import main

    game = tmp_path / "game"
    argv = [
        "prep",
        "synthetic",
        "--out",
        str(game),
        "--num-train",
        "2",
        "--num-val",
        "0",
        "--num-test",
        "1",
        "--size",
        "32x64",
        "--style",
        "game",
        "--procs",
        "1",
        "--shard-size",
        "4",
        "--quiet",
    ]
    assert main(argv) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    game_rows = pq.read_table(game / "manifest.parquet").to_pylist()
    assert {r["domain"] for r in game_rows} == {"synth-game"}
    assert sorted(r["split"] for r in game_rows) == ["test", "train", "train"]
    game_frames = [s["frames"][0] for r in {r["shard"] for r in game_rows} for s in _read_shard(game / r)]
    city_frames = [s["frames"][0] for r in {r["shard"] for r in rows} for s in _read_shard(out / r)]
    assert len(game_frames) == 3
    # the game domain is far more saturated than the muted city palette
    assert _chroma(game_frames) > 1.5 * _chroma(city_frames)
    report = json.loads((game / "prep_report.json").read_text())
    assert report["generator"]["style"] == "game"


def test_cli_rejects_empty_dataset(tmp_path, capsys):
    from sdeseg.cli import main

    argv = ["prep", "synthetic", "--out", str(tmp_path), "--num-train", "0", "--num-val", "0"]
    assert main([*argv, "--num-test", "0"]) == 2
    assert "positive number of samples" in capsys.readouterr().err
    for size in ("4x64", "96"):  # below the generator's 8x8 minimum; not HxW
        with pytest.raises(SystemExit):
            main([*argv, "--size", size])
        assert f"got '{size}'" in capsys.readouterr().err
