"""The streaming reader: distribution, exact resume, corrupt data, validation, labeled pool, val."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.shards import Job, write_shards
from sdeseg.config import AugmentConfig, DataConfig
from sdeseg.data.codec import SampleError, decode_sample, encode_image, encode_npy, encode_sample
from sdeseg.data.derived import write_derived
from sdeseg.data.manifest import DatasetError, read_manifest, write_manifest
from sdeseg.data.reader import (
    LabeledPool,
    ShardStream,
    ValLoader,
    buffered_permutation,
    labeled_keys_for,
    make_loader,
    random_labeled_keys,
    read_key_list,
)

H, W = 16, 24
CROP = (8, 16)


def convert(job: Job) -> dict:
    """A small random sample: 3 frames, depth, K, T; a label when ``payload["label"]``.

    ``payload["defect"]`` breaks one member: "png" (undecodable cur.png), "no_K" (json
    without K), "depth_shape" (depth one column short), "prev_shape" (prev frame half height).
    """
    p = job.payload
    rng = np.random.default_rng(p["seed"])
    frames = {f: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for f in (-1, 0, 1)}
    T = np.eye(4)
    T[:3, 3] = rng.normal(size=3)
    meta = {"K": [[20.0, 0, 11.5], [0, 21.0, 7.5], [0, 0, 1]], "domain": job.domain, "split": job.split,
            "T_prev": T.tolist(), "T_next": np.linalg.inv(T).tolist()}
    label = rng.integers(0, 19, (H, W), dtype=np.uint8) if p.get("label") else None
    depth = rng.uniform(1.0, 10.0, (H, W)).astype(np.float32)
    members = encode_sample(job.key, frames, meta, label, depth)
    defect = p.get("defect")
    if defect == "png":
        members["cur.png"] = b"these bytes are not a PNG"
    elif defect == "no_K":
        members["json"] = json.dumps({k: v for k, v in json.loads(members["json"]).items() if k != "K"}).encode()
    elif defect == "depth_shape":
        members["depth.npy"] = encode_npy(depth[:, :-1])
    elif defect == "prev_shape":
        members["prev.png"] = encode_image(frames[-1][: H // 2])
    return members


def make_dataset(root, n_train, shard_size, *, n_val=0, bad=(), defects=None, labeled_every=2):
    """``bad``: train indices with an undecodable cur.png; ``defects``: key -> defect (see convert)."""
    defects = {**{f"syn/train/{i:04d}": "png" for i in bad}, **(defects or {})}
    jobs = [Job(f"syn/train/{i:04d}", "syn", "train", {"seed": i, "label": i % labeled_every == 0})
            for i in range(n_train)]
    jobs += [Job(f"syn/val/{i:04d}", "syn", "val", {"seed": 1000 + i, "label": True}) for i in range(n_val)]
    jobs = [Job(j.key, j.domain, j.split, {**j.payload, "defect": defects.get(j.key)}) for j in jobs]
    write_shards(str(root), jobs, convert, shard_size=shard_size, procs=1, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def even_ds(tmp_path_factory):
    # 24 train samples in shards of 5,5,5,5,4 (uneven), 10 val samples
    return make_dataset(tmp_path_factory.mktemp("even"), 24, 5, n_val=10)


@pytest.fixture(scope="module")
def odd_ds(tmp_path_factory):
    # 23 samples in shards of 4,4,4,4,4,3: not a multiple of ranks x workers x batch
    return make_dataset(tmp_path_factory.mktemp("odd"), 23, 4)


def stream(root, **kw):
    args = dict(batch_size=2, crop=CROP, augment=AugmentConfig(), shuffle_buffer=4, seed=3, num_workers=0)
    args.update(kw)
    return ShardStream(root, "train", **args)


def same_batches(a, b):
    assert [x.keys for x in a] == [y.keys for y in b]
    for x, y in zip(a, b):
        for fid in x.images:
            assert torch.equal(x.images[fid], y.images[fid])
            assert torch.equal(x.images_aug[fid], y.images_aug[fid])
        assert torch.equal(x.K, y.K)


# ----------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("ds_name", ["even_ds", "odd_ds"])
def test_two_ranks_two_workers_see_each_sample_once_per_epoch(ds_name, request):
    root = request.getfixturevalue(ds_name)
    n = len([r for r in read_manifest(root) if r["split"] == "train"])
    per_rank = []
    for rank in range(2):
        s = stream(root, rank=rank, world_size=2, num_workers=2, epochs=2)
        per_rank.append((s.batches_per_epoch, list(s)))
    bpe = per_rank[0][0]
    assert bpe == per_rank[1][0] == 2 * (n // (2 * 2 * 2))  # workers * samples per reader / batch
    for _, batches in per_rank:
        assert len(batches) == 2 * bpe  # identical batch counts on both ranks
        assert all(len(b) == 2 for b in batches)
    epochs = []
    for e in range(2):
        keys = [k for _, batches in per_rank for b in batches[e * bpe:(e + 1) * bpe] for k in b.keys]
        assert len(keys) == len(set(keys)) == (n // 8) * 8  # no sample twice in an epoch
        epochs.append(keys)
    if n % 8 == 0:
        assert set(epochs[0]) == set(epochs[1]) == {f"syn/train/{i:04d}" for i in range(n)}
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_in_process_equals_one_worker(even_ds):
    in_process = list(stream(even_ds, num_workers=0, epochs=1))
    same_batches(in_process, list(stream(even_ds, num_workers=1, epochs=1)))


def _fields_equal(a, b):
    """Every field of two batches equal (tensors bitwise, dtypes included)."""
    assert a.keys == b.keys
    for name in ("images", "images_aug", "K", "inv_K", "label", "depth", "T", "geometry", "derived"):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
        elif x is None:
            assert y is None, name
        else:
            assert torch.equal(x, y) and x.dtype == y.dtype, name


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("augment", [AugmentConfig(), None], ids=["jitter", "no-augment"])
def test_a_uint8_stream_moved_with_batch_to_equals_the_float_stream(even_ds, workers, augment):
    """as_float=False hands out the readers' uint8 images; Batch.to converts them on the target
    device to exactly the float batch the default stream gives, and keeps images_aug one copy
    of images where there is no jitter."""
    floats = list(stream(even_ds, num_workers=workers, epochs=1, augment=augment))
    raw = list(stream(even_ds, num_workers=workers, epochs=1, augment=augment, as_float=False))
    assert len(raw) == len(floats) > 2
    for r, f in zip(raw, floats):
        assert all(x.dtype == torch.uint8 for x in (*r.images.values(), *r.images_aug.values()))
        assert (r.images_aug is r.images) == (augment is None)
        moved = r.to("cpu")
        _fields_equal(moved, f)
        assert (moved.images_aug is moved.images) == (augment is None)
        assert r.images[0].dtype == torch.uint8  # moving made a new batch, the shipped one is unchanged
    assert float(floats[0].images[0].max()) > 0.9  # images in [0, 1], not [0, 255]


def test_a_float_batch_moves_unchanged_and_keeps_one_copy_of_unjittered_images(even_ds):
    b = next(iter(stream(even_ds, augment=None)))
    moved = b.to("cpu")
    assert moved.images_aug is moved.images and moved.images[0] is b.images[0]  # nothing copied on one device
    jittered = next(iter(stream(even_ds)))
    moved = jittered.to(torch.device("cpu"), non_blocking=False)
    assert moved.images_aug is not moved.images and torch.equal(moved.images_aug[0], jittered.images_aug[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_uint8_batches_copy_to_the_gpu_and_convert_there(even_ds, workers):
    """pin_memory=True: page-locked uint8 batches (pinned by the DataLoader's thread, or in
    process without workers); Batch.to(cuda) copies them asynchronously and converts on the
    GPU to the host conversion's values (the GPU divides by multiplying with 1/255: 1 ulp)."""
    floats = list(stream(even_ds, num_workers=workers, epochs=1))
    pinned = list(stream(even_ds, num_workers=workers, epochs=1, as_float=False, pin_memory=True))
    for p, f in zip(pinned, floats):
        assert p.images[0].is_pinned() and p.images[0].dtype == torch.uint8 and p.K.is_pinned()
        moved = p.to("cuda")
        assert moved.images[0].device.type == "cuda" and moved.images[0].dtype == torch.float32
        for fid in f.images:
            torch.testing.assert_close(moved.images[fid].cpu(), f.images[fid], rtol=0, atol=1.2e-7)
            torch.testing.assert_close(moved.images_aug[fid].cpu(), f.images_aug[fid], rtol=0, atol=1.2e-7)
        assert torch.equal(moved.label.cpu(), f.label) and torch.equal(moved.K.cpu(), f.K)


def test_batch_contents(even_ds):
    b = next(iter(stream(even_ds, batch_size=4)))
    assert set(b.images) == {-1, 0, 1}
    assert b.images[0].shape == (4, 3, *CROP) and b.images[0].dtype == torch.float32
    assert 0.0 <= float(b.images[0].min()) and float(b.images[0].max()) <= 1.0
    assert not torch.equal(b.images[0], b.images_aug[0])  # jittered copy
    assert b.K.shape == b.inv_K.shape == (4, 3, 3)
    assert torch.allclose(b.K @ b.inv_K, torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert b.label.shape == (4, *CROP) and b.label.dtype == torch.int64
    unlabeled = [i for i, k in enumerate(b.keys) if int(k[-4:]) % 2]
    for i in unlabeled:
        assert (b.label[i] == 255).all()
    assert b.depth.shape == (4, 1, *CROP) and set(b.T) == {-1, 1}
    nolab = next(iter(stream(even_ds, batch_size=4, labels=False, frames=(0,), augment=None)))
    assert nolab.label is None and nolab.T is None and set(nolab.images) == {0}
    assert nolab.images_aug is nolab.images


def test_a_key_set_keeps_only_those_labels_with_the_same_crops(even_ds):
    """labels=<keys>: those samples' labels exactly as labels=True reads them (same crop and
    flip), every other row all ignore, and no label at all for a batch without one of them."""
    full = list(stream(even_ds, batch_size=4, epochs=1))
    labeled = [k for b in full for i, k in enumerate(b.keys) if (b.label[i] != 255).any()]
    chosen = set(labeled[::3])
    some = list(stream(even_ds, batch_size=4, epochs=1, labels=chosen))
    assert [b.keys for b in some] == [b.keys for b in full] and len(chosen) >= 2
    for a, b in zip(full, some):
        assert torch.equal(a.images[0], b.images[0])
        rows = [i for i, k in enumerate(a.keys) if k in chosen]
        if not rows:
            assert b.label is None
            continue
        for i, k in enumerate(a.keys):
            assert torch.equal(b.label[i], a.label[i]) if k in chosen else (b.label[i] == 255).all()
    none = list(stream(even_ds, batch_size=4, epochs=1, labels=set()))
    assert all(b.label is None for b in none)


def test_buffered_permutation_is_bounded():
    perm = buffered_permutation(100, 7, np.random.default_rng(0))
    assert sorted(perm.tolist()) == list(range(100))
    assert all(p < i + 7 for i, p in enumerate(perm))


def test_too_few_samples_for_one_batch_per_rank(even_ds):
    with pytest.raises(DatasetError, match="no rank would get a single batch"):
        stream(even_ds, batch_size=8, world_size=4, num_workers=1)


# ----------------------------------------------------------------------------- derived maps


def red_and_ids(key, frame):
    """Two maps of a sample a test can check pixel by pixel: the red channel of its centre frame
    (float32) and a per-key ramp (int64)."""
    ramp = np.arange(H * W, dtype=np.int64).reshape(H, W) + 1000 * int(key[-4:])
    return {"red.npy": encode_npy(frame[..., 0].astype(np.float32)), "ids.npy": encode_npy(ramp)}


@pytest.fixture(scope="module")
def derived_ds(even_ds, tmp_path_factory):
    return write_derived(even_ds, str(tmp_path_factory.mktemp("derived") / "d"), red_and_ids)


def edit_manifest(root, out, edit):
    """A copy of the derived dataset ``root`` at ``out`` whose manifest rows went through ``edit``."""
    shutil.copytree(root, out)
    write_manifest(str(out), [r for r in map(edit, read_manifest(str(out))) if r is not None])
    return str(out)


def test_derived_maps_are_cropped_and_flipped_with_the_images(even_ds, derived_ds):
    joins = {"red": (derived_ds, "red.npy"), "ids": (derived_ds, "ids.npy")}
    batches = list(stream(even_ds, batch_size=4, epochs=2, derived=joins))
    flips = torch.cat([b.geometry[:, 4] for b in batches])
    assert 0 < int(flips.sum()) < len(flips)  # both kinds
    for b in batches:
        assert set(b.derived) == {"red", "ids"} and b.derived["red"].shape == (4, *CROP)
        # the red channel of the (unjittered) images, pixel for pixel
        assert torch.equal(b.derived["red"], b.images[0][:, 0].mul(255).round())
        for i, (y0, x0, h, w, flip) in enumerate(b.geometry.tolist()):
            want = torch.arange(H * W).reshape(H, W)[y0:y0 + h, x0:x0 + w] + 1000 * int(b.keys[i][-4:])
            assert torch.equal(b.derived["ids"][i], want.flip(-1) if flip else want)


def test_derived_maps_travel_from_workers_and_resume(even_ds, derived_ds):
    joins = {"ids": (derived_ds, "ids.npy")}
    ref = list(stream(even_ds, num_workers=0, epochs=2, derived=joins))
    workers = list(stream(even_ds, num_workers=1, epochs=2, derived=joins))
    first = stream(even_ds, num_workers=1, epochs=2, derived=joins)
    it = iter(first)
    consumed = [next(it) for _ in range(5)]
    resumed = stream(even_ds, num_workers=1, epochs=2, derived=joins)
    resumed.load_state_dict(first.state_dict())
    del it
    for run in (workers, consumed + list(resumed)):
        same_batches(run, ref)
        assert all(torch.equal(a.derived["ids"], b.derived["ids"]) for a, b in zip(run, ref))


def test_derived_datasets_that_do_not_fit_are_refused(even_ds, derived_ds, tmp_path):
    missing = edit_manifest(derived_ds, tmp_path / "missing", lambda r: None if r["key"] == "syn/train/0004" else r)
    with pytest.raises(DatasetError, match=r"missing has no red.npy for 1 of the 24 samples of split 'train' of "
                                           r".*even.*syn/train/0004"):
        stream(even_ds, derived={"red": (missing, "red.npy")})
    other_size = edit_manifest(derived_ds, tmp_path / "other_size", lambda r: {**r, "height": H // 2})
    with pytest.raises(DatasetError, match=rf"red.npy of syn/train/\d+ is {H // 2}x{W}, the image is {H}x{W}"):
        stream(even_ds, derived={"red": (other_size, "red.npy")})
    half = write_derived(even_ds, str(tmp_path / "half"), lambda key, frame: {"red.npy": encode_npy(
        frame[::2, :, 0].astype(np.float32))})  # its manifest says full size, the maps are not
    with pytest.raises(DatasetError, match=rf"half: red.npy of syn/train/\d+ is {H // 2}x{W}, the image is {H}x{W}"):
        next(iter(stream(even_ds, derived={"red": (half, "red.npy")})))
    with pytest.raises(DatasetError, match="derived.json does not exist"):
        stream(even_ds, derived={"red": (even_ds, "red.npy")})
    no_member = stream(even_ds, derived={"depth": (derived_ds, "pseudo_depth.npy")})
    with pytest.raises(DatasetError, match=r"no member 'pseudo_depth.npy' \(for 'depth'\); it holds \['ids.npy', "
                                           r"'red.npy'\]"):
        next(iter(no_member))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(even_ds, workers):
    ref = list(stream(even_ds, num_workers=workers, epochs=3))
    bpe = stream(even_ds, num_workers=workers).batches_per_epoch
    assert len(ref) == 3 * bpe
    for k in (3, bpe + 1):  # mid-epoch (odd, so worker 1 is due next) and past an epoch boundary
        first = stream(even_ds, num_workers=workers, epochs=3)
        it = iter(first)
        consumed = [next(it) for _ in range(k)]
        state = first.state_dict()
        assert (state["epoch"], state["batches_in_epoch"]) == divmod(k, bpe)
        del it
        resumed = stream(even_ds, num_workers=workers, epochs=3)
        resumed.load_state_dict(state)
        same_batches(consumed + list(resumed), ref)


def test_state_dict_layout_mismatch(even_ds):
    state = stream(even_ds, num_workers=2).state_dict()
    other = stream(even_ds, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    state.update(epoch=2, batches_in_epoch=1)
    other.load_state_dict(state, strict=False)
    assert other.state_dict()["epoch"] == 3 and other.state_dict()["batches_in_epoch"] == 0


def test_new_iter_continues_where_the_last_stopped(even_ds):
    ref = list(stream(even_ds, epochs=1))
    s = stream(even_ds, epochs=1)
    head = [b for _, b in zip(range(2), s)]
    same_batches(head + list(s), ref)


# ----------------------------------------------------------------------------- corrupt data


@pytest.fixture(scope="module")
def bad_ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("bad"), 24, 6, bad=(7,))


def test_corrupt_sample_is_skipped_and_counted(bad_ds, caplog):
    s = stream(bad_ds, epochs=1, max_corrupt_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        batches = list(s)
    assert len(batches) == s.batches_per_epoch  # slot refilled: batch count unchanged
    keys = [k for b in batches for k in b.keys]
    assert "syn/train/0007" not in keys
    assert len(keys) == 24 and len(set(keys)) == 23  # one good sample filled the bad one's slot
    assert s.corrupt_count == 1
    assert "syn/train/0007" in caplog.text and "syn-train-00001.tar" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_corrupt_samples_raise(bad_ds, workers):
    with pytest.raises(RuntimeError, match=r"syn/train/0007 in syn-train-00001\.tar"):
        list(stream(bad_ds, epochs=1, num_workers=workers, max_corrupt_fraction=0.0))


MALFORMED = {"no_K": "json member has no K", "depth_shape": "depth.npy is (16, 23)",
             "prev_shape": "prev.png is (8, 24)"}


@pytest.fixture(scope="module")
def malformed_ds(tmp_path_factory):
    # one sample of each malformation in train (shards of 6) and in val
    defects = {"syn/train/0003": "no_K", "syn/train/0010": "depth_shape", "syn/train/0017": "prev_shape",
               "syn/val/0001": "no_K", "syn/val/0004": "depth_shape", "syn/val/0008": "prev_shape"}
    return make_dataset(tmp_path_factory.mktemp("malformed"), 24, 6, n_val=10, defects=defects)


@pytest.mark.parametrize("defect", sorted(MALFORMED))
def test_decode_names_the_malformed_member(defect):
    members = convert(Job("syn/train/x", "syn", "train", {"seed": 0, "defect": defect}))
    with pytest.raises(SampleError, match="^" + re.escape(f"syn/train/x: {MALFORMED[defect]}")):
        decode_sample(members)


@pytest.mark.parametrize("name, value", [
    ("K", [[1.0, 0.0], [0.0, 1.0]]), ("K", [[float("nan"), 0, 1], [0, 1, 1], [0, 0, 1]]), ("K", "eye"),
    ("T_prev", np.eye(3).tolist()), ("T_next", [[0, 0, 0, "x"]] * 4), ("T_next", None),
])
def test_decode_rejects_bad_matrices(name, value):
    members = convert(Job("syn/train/x", "syn", "train", {"seed": 0}))
    meta = json.loads(members["json"])
    meta[name] = value
    members["json"] = json.dumps(meta).encode()
    with pytest.raises(SampleError, match=rf"^syn/train/x: json member's {name} "):
        decode_sample(members)


@pytest.mark.parametrize("workers", [0, 2])
def test_malformed_samples_are_skipped_and_counted(malformed_ds, workers, caplog):
    s = stream(malformed_ds, epochs=1, num_workers=workers, max_corrupt_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        batches = list(s)
    assert len(batches) == s.batches_per_epoch
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 24 and len(set(keys)) == 21
    assert not {"syn/train/0003", "syn/train/0010", "syn/train/0017"} & set(keys)
    assert s.corrupt_count == 3
    if workers == 0:  # worker processes log in their own process
        for text in MALFORMED.values():
            assert text in caplog.text


def test_val_loader_skips_malformed_samples(malformed_ds):
    ldr = ValLoader(malformed_ds, batch_size=3, frames=(-1, 0, 1), max_corrupt_fraction=0.5)
    keys = [k for b in ldr for k in b.keys]
    assert keys == [f"syn/val/{i:04d}" for i in (0, 2, 3, 5, 6, 7, 9)]
    assert ldr.corrupt_count == 3


def test_truncated_shard_counts_lost_samples_as_corrupt(even_ds, tmp_path):
    root = tmp_path / "trunc"
    shutil.copytree(even_ds, root)
    tar = root / "syn-train-00002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    s = stream(str(root), epochs=1, max_corrupt_fraction=0.5)
    batches = list(s)
    assert len(batches) == s.batches_per_epoch
    assert 1 <= s.corrupt_count <= 5


# ----------------------------------------------------------------------------- validation


def test_missing_shard_is_named_before_reading(even_ds, tmp_path):
    root = tmp_path / "missing"
    shutil.copytree(even_ds, root)
    (root / "syn-train-00003.tar").unlink()
    with pytest.raises(DatasetError, match="syn-train-00003.tar"):
        stream(str(root))
    with pytest.raises(DatasetError, match="syn-train-00003.tar"):
        LabeledPool(str(root), ["syn/train/0016"], batch_size=1, crop=CROP, augment=None, seed=0)


def test_shard_content_disagreeing_with_manifest(even_ds, tmp_path):
    root = tmp_path / "swapped"
    shutil.copytree(even_ds, root)
    shutil.copy(root / "syn-train-00001.tar", root / "syn-train-00000.tar")
    with pytest.raises(DatasetError, match=r"syn-train-00000\.tar.*'syn/train/0005'.*'syn/train/0000'"):
        list(stream(str(root), epochs=1))
    with pytest.raises(DatasetError, match=r"syn-train-00000\.tar"):
        list(stream(str(root), epochs=1, num_workers=2))


def test_shard_missing_a_manifest_sample(even_ds, tmp_path):
    root = tmp_path / "short"
    shutil.copytree(even_ds, root)
    rows = read_manifest(str(root))
    extra = dict(rows[0], key="syn/train/9999", index=4, shard="syn-train-00004.tar")
    assert pq.read_table(root / "manifest.parquet").num_rows == 34
    write_manifest(str(root), rows + [extra])
    with pytest.raises(DatasetError, match=r"syn-train-00004\.tar.*'syn/train/9999'"):
        list(stream(str(root), epochs=1, batch_size=1, world_size=1))


def test_unknown_whitelist_keys(even_ds):
    with pytest.raises(DatasetError, match="2 key"):
        stream(even_ds, keys=["syn/train/0001", "nope/a/b", "syn/val/0001"])
    s = stream(even_ds, exclude_keys=[f"syn/train/{i:04d}" for i in range(8)], epochs=1)
    keys = {k for b in s for k in b.keys}
    assert keys == {f"syn/train/{i:04d}" for i in range(8, 24)}


def test_fsspec_file_url(even_ds):
    a = list(stream(even_ds, epochs=1))
    b = list(stream("file://" + even_ds, epochs=1))
    same_batches(a, b)
    assert len(list(ValLoader("file://" + even_ds, batch_size=4))) == 3


# ----------------------------------------------------------------------------- labeled pool


def test_labeled_pool_errors(even_ds):
    unknown = [f"syn/train/x{i}" for i in range(7)]
    with pytest.raises(DatasetError, match=r"7 key\(s\).*'syn/train/x0'.*'syn/train/x4', \.\.\."):
        LabeledPool(even_ds, ["syn/train/0000"] + unknown, batch_size=2, crop=CROP, augment=None, seed=0)
    with pytest.raises(DatasetError, match="syn/train/0003"):
        LabeledPool(even_ds, ["syn/train/0000", "syn/train/0003"], batch_size=2, crop=CROP, augment=None,
                    seed=0)


def test_labeled_pool_is_deterministic_and_resumable(even_ds):
    keys = random_labeled_keys(even_ds, "train", 6, seed=1)
    assert keys == random_labeled_keys(even_ds, "train", 6, seed=1)
    assert keys != random_labeled_keys(even_ds, "train", 6, seed=2)
    assert all(int(k[-4:]) % 2 == 0 for k in keys)
    with pytest.raises(DatasetError, match="12 labeled"):
        random_labeled_keys(even_ds, "train", 13, seed=1)

    def pool(**kw):
        return LabeledPool(even_ds, keys, batch_size=4, crop=CROP, augment=AugmentConfig(), seed=5, **kw)

    a, b = pool(), pool()
    ref = [a.next_batch() for _ in range(5)]
    b.next_batch()
    b.next_batch()
    c = pool()
    c.load_state_dict(b.state_dict())
    same_batches(ref[2:], [c.next_batch() for _ in range(3)])
    assert all(batch.label is not None and batch.label.shape == (4, *CROP) for batch in ref)
    # 12 draws = two shuffled passes over the 6 keys
    assert Counter(k for batch in ref[:3] for k in batch.keys) == Counter({k: 2 for k in keys})
    # two ranks of batch 2 draw what one rank of batch 4 draws, split in halves
    r0, r1 = (LabeledPool(even_ds, keys, batch_size=2, crop=CROP, augment=AugmentConfig(), seed=5,
                          rank=r, world_size=2) for r in range(2))
    for batch in ref[:3]:
        x, y = r0.next_batch(), r1.next_batch()
        assert x.keys + y.keys == batch.keys
        assert torch.equal(torch.cat([x.images[0], y.images[0]]), batch.images[0])


def test_labeled_keys_and_loader_from_config(even_ds, tmp_path):
    cfg = DataConfig(root=even_ds, num_labeled=3, labeled_seed=4, batch_size=2, size=CROP, num_workers=0)
    assert labeled_keys_for(cfg) == random_labeled_keys(even_ds, "train", 3, seed=4)
    (tmp_path / "k.txt").write_text("syn/train/0002\n")
    assert labeled_keys_for(DataConfig(root=even_ds, labeled_keys=str(tmp_path / "k.txt"))) == ["syn/train/0002"]
    assert labeled_keys_for(DataConfig(root=even_ds)) == []
    s = make_loader(cfg, seed=1, epochs=1)
    assert s.batches_per_epoch == 12 and next(iter(s)).images[0].shape == (2, 3, *CROP)


def test_read_key_list(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# chosen by hand\nsyn/train/0000\n\n  syn/train/0002  # ok\n")
    assert read_key_list(str(f)) == ["syn/train/0000", "syn/train/0002"]
    f.write_text("a/b/c\na/b/c\n")
    with pytest.raises(DatasetError, match="keys.txt:2"):
        read_key_list(str(f))


# ----------------------------------------------------------------------------- validation loader


def test_val_loader_splits_by_rank(even_ds):
    loaders = [ValLoader(even_ds, batch_size=3, rank=r, world_size=2) for r in range(2)]
    keys = [[k for b in ldr for k in b.keys] for ldr in loaders]
    assert sorted(keys[0] + keys[1]) == [f"syn/val/{i:04d}" for i in range(10)]
    assert not set(keys[0]) & set(keys[1])
    assert keys[0] == [k for b in loaders[0] for k in b.keys]  # deterministic
    b = next(iter(loaders[0]))
    assert b.images[0].shape == (3, 3, H, W) and b.label.shape == (3, H, W) and len(loaders[0]) == 2
    assert len(list(ValLoader(even_ds, batch_size=2, max_batches=2))) == 2


def test_the_handoff_benchmark_times_both_paths(capsys):
    """`python -m sdeseg.data.bench --handoff`: both hand-offs, a time each; on the CPU nothing is
    copied (the GPU figures come from a GPU machine, BENCHMARKS.md)."""
    from sdeseg.data.bench import _uint8_batch, main

    main(["--handoff", "--device", "cpu", "--size", "8", "16", "--repeats", "2", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["host float32", "uint8, converted on the device"]
    assert all(float(r[1]) > 0 and float(r[2]) == 0 for r in rows)
    b = _uint8_batch(2, 8, 16, seed=0)  # what it hands off: a jittered uint8 triplet batch
    assert b.images[0].dtype == torch.uint8 and b.images_aug is not b.images and b.images[0].shape == (2, 3, 8, 16)
