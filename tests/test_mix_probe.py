"""The DepthMix probe: its masks and counts by hand, and a run on the fixture dataset."""

import pytest
import torch

from sdeseg.config import SsdaConfig
from sdeseg.data.classes import class_names
from tune import mix_probe


def test_keep_mask_keeps_the_closer_image_and_treats_invalid_depth_as_far():
    depth = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    depth[1, 0, 0, 0] = 0.0  # invalid: farther than anything
    perm = torch.tensor([1, 2, 0])
    m = mix_probe.keep_mask(depth, perm)
    assert m[0].all()  # 1 < 2, and 1 < inf at the invalid pixel
    assert m[1].sum() == 3 and not m[1, 0, 0]  # 2 < 3 except the invalid pixel
    assert not m[2].any()  # 3 > 1
    tie = torch.ones(2, 1, 2, 2)
    assert not mix_probe.keep_mask(tie, torch.tensor([1, 0])).any()
    assert mix_probe.keep_mask(tie, torch.tensor([1, 0]), eps=0.1).all()  # eps keeps ties


def test_keep_stats_count_per_class():
    stats = mix_probe.KeepStats(3)
    label = torch.tensor([[[0, 0, 1, 255]]])
    pseudo = torch.tensor([[[True, False, True, True]]])
    true = torch.tensor([[[True, True, False, False]]])
    # a batch of one image is its own partner: the mix leaves the labels as they are
    stats.update(label, pseudo, true, label)
    # rows: total, kept by pseudo, kept by true, agree, mixed by pseudo, mixed by true;
    # the ignore pixel is not counted
    assert stats.counts.tolist() == [[2, 1, 0], [1, 1, 0], [2, 0, 0], [1, 0, 0], [2, 1, 0], [2, 1, 0]]
    rows = {c: r for c, *r in stats.rows()}
    assert set(rows) == {0, 1}  # class 2 is absent
    assert rows[0] == [2 / 3, 0.5, 1.0, 0.5, 1.0, 1.0] and rows[1] == [1 / 3, 1.0, 0.0, 0.0, 1.0, 1.0]

    # two images: image 0 all class 0, image 1 all class 1; the pseudo mask keeps image 0
    # everywhere and drops image 1 (class 0 fills both mixes), the true mask keeps each itself
    stats = mix_probe.KeepStats(2)
    label = torch.tensor([[[0, 0]], [[1, 1]]])
    keep0 = torch.tensor([[[True, True]], [[False, False]]])
    stats.update(label, keep0, torch.ones_like(keep0), label[torch.tensor([1, 0])])
    assert stats.counts[4].tolist() == [4, 0] and stats.counts[5].tolist() == [2, 2]
    rows = {c: r for c, *r in stats.rows()}
    assert rows[0][4:] == [2.0, 1.0] and rows[1][4:] == [0.0, 1.0]  # class 0's share doubled


def test_probe_on_the_fixture_with_an_untrained_export(synthetic_root, tmp_path, capsys):
    from sdeseg.models import build_sde_model
    from sdeseg.stages.sde import export_payload
    from tests.conftest import tiny_config

    cfg = tiny_config("demo_sde", synthetic_root)
    torch.manual_seed(0)
    path = tmp_path / "sde.pt"
    torch.save(export_payload(build_sde_model(cfg.model), cfg, 0, {}), path)
    assert mix_probe.main(["--data", synthetic_root, "--sde-export", str(path), "--images", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[1].strip(): [float(c.strip(" %")) for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert set(rows) - {"all"} <= set(class_names()) and len(rows) > 3
    assert abs(sum(v[0] for k, v in rows.items() if k != "all") - 100) < 0.1  # shares add up
    assert all(0 <= x <= 1 for v in rows.values() for x in v[1:4])
    assert all(x >= 0 for v in rows.values() for x in v[4:])
    shares = {k: v[0] / 100 for k, v in rows.items() if k != "all"}
    for col in (4, 5):  # the mixed shares are shares too: they add up to 1 (to the printed rounding)
        assert abs(sum(shares[k] * rows[k][col] for k in shares) - 1) < 0.02
    # ground-truth sky has no depth (infinitely far): true depth never keeps it over its partner
    assert rows["sky"][2] == 0.0


def test_keep_stats_count_a_source_partner():
    # Cross-Domain DepthMix: the partner is a source image with its own labels (class 2 here)
    stats = mix_probe.KeepStats(3)
    label = torch.tensor([[[0, 0, 1, 1]]])
    source = torch.tensor([[[2, 2, 255, 2]]])
    kept = torch.tensor([[[True, False, False, True]]])  # pixels 1, 2 pasted; pixel 2's source has no label
    stats.update(label, kept, torch.ones_like(kept), source)
    assert stats.counts[1].tolist() == [1, 1, 0]  # kept target pixels per class
    assert stats.counts[4].tolist() == [1, 1, 1]  # mixed labels: 0 kept, 2 pasted, 1 kept; the ignore not counted
    rows = {c: r for c, *r in stats.rows()}
    assert rows[0][1] == 0.5 and rows[1][1] == 0.5 and 2 not in rows  # class 2 is not the target's
    assert rows[0][4] == pytest.approx((1 / 3) / 0.5)


def _untrained_export(synthetic_root, tmp_path, seed):
    from sdeseg.models import build_sde_model
    from sdeseg.stages.sde import export_payload
    from tests.conftest import tiny_config

    cfg = tiny_config("demo_sde", synthetic_root)
    torch.manual_seed(seed)
    path = tmp_path / f"sde{seed}.pt"
    torch.save(export_payload(build_sde_model(cfg.model), cfg, 0, {}), path)
    return str(path)


def test_cross_probe_on_the_fixture(synthetic_root, tmp_path, capsys):
    target, source = _untrained_export(synthetic_root, tmp_path, 0), _untrained_export(synthetic_root, tmp_path, 1)
    run = dict(images=8, source_images=12, batch=4)
    a = mix_probe.cross_probe(synthetic_root, target, synthetic_root, source, candidates=3, seed=0, **run)
    b = mix_probe.cross_probe(synthetic_root, target, synthetic_root, source, candidates=3, seed=0, **run)
    c = mix_probe.cross_probe(synthetic_root, target, synthetic_root, source, candidates=1, seed=0, **run)
    assert torch.equal(a.counts, b.counts)  # seeded
    assert torch.equal(a.counts[0], c.counts[0])  # the targets' pixels do not depend on the pairing
    assert (a.counts[1] <= a.counts[0]).all() and 0 < a.counts[1].sum() < a.counts[0].sum()
    # an eps that outweighs any depth gap pastes the source where its sign is +, keeps the target where -:
    # some images wholly source, some wholly target (8 images, 1/2 each)
    big = mix_probe.cross_probe(synthetic_root, target, synthetic_root, source, candidates=1, seed=0,
                                cfg=SsdaConfig(mix_eps=1e6), **run)
    kept = big.counts[1].sum() / big.counts[0].sum()
    assert 0 < kept < 1

    assert mix_probe.main(["--data", synthetic_root, "--sde-export", target, "--source", synthetic_root,
                           "--source-sde", source, "--images", "8", "--source-images", "12"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Cross-Domain DepthMix, 5 candidate(s), match median")
    rows = {line.split("|")[1].strip(): [float(c.strip(" %")) for c in line.split("|")[2:-1]] for line in lines[4:]}
    assert abs(sum(v[0] for k, v in rows.items() if k != "all") - 100) < 0.1
    with pytest.raises(SystemExit):
        mix_probe.main(["--data", synthetic_root, "--sde-export", target, "--source", synthetic_root])
    assert "--source-sde" in capsys.readouterr().err
