"""The domain-adaptation stage in-process: a synthetic city target with a synthetic game source,
each with its own SDE export; exact resume; domain keys; bad input before workers start."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from sdeseg.config import ConfigError
from sdeseg.launch import preflight, run_in_process
from tests.conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def game_root(tmp_path_factory) -> str:
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("game") / "game"
    generate(str(root), num_train=12, num_val=0, num_test=0, size=(32, 64), seed=5, procs=1, shard_size=6,
             progress=False, style="game")
    return str(root)


@pytest.fixture(scope="module")
def exports(synthetic_root, game_root, tmp_path_factory):
    out = {}
    for name, root in (("city", synthetic_root), ("game", game_root)):
        run_dir = tmp_path_factory.mktemp(f"sde_{name}")
        extra = ["data.test_split=null", "data.val_split=train"] if name == "game" else []
        out[name] = run_in_process(tiny_config("demo_sde", root, "train.steps=2", *extra), run_dir)["exports"]["last"]
    return out


def _ssda(root, game_root, exports, *extra):
    return tiny_config("demo_ssda", root, f"semiseg.sde_checkpoint={exports['city']}", f"ssda.source_root={game_root}",
                       f"ssda.source_sde_checkpoint={exports['game']}", "data.num_labeled=4", "ssda.mgs_candidates=3",
                       "train.ckpt_every=3", "train.log_keys=true", "optim.schedule=constant", *extra)


def _teacher(run_dir, step):
    path = run_dir / "checkpoints" / f"ckpt_{step:06d}" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["sdeseg"]["teacher"]["model"]


def test_ssda_trains_with_both_domains_and_keeps_their_keys(synthetic_root, game_root, exports, tmp_path):
    summary = run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=2"), tmp_path)
    assert summary["steps"] == 2 and 0.0 <= summary["seg/miou"] <= 1.0 and "test/seg/miou" in summary
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["seg/source"] > 0 and r["seg/cross"] > 0 and r["seg/unsup"] >= 0 for r in train)
    keys = [r["keys"] for r in records if r["kind"] == "keys"]
    for step_keys in keys:  # 2 labeled + 2 unlabeled targets, then 2 x 3 source candidates
        assert all(k.startswith("synth-city/") for k in step_keys[:4])
        assert len(step_keys) == 10 and all(k.startswith("synth-game/") for k in step_keys[4:])


def test_report_figures_show_the_stage_choice_and_mix(synthetic_root, game_root, exports, tmp_path):
    """sdeseg.report.ssda_figures on a finished run: per target the candidate with the smallest
    criterion is the chosen one, the random one is another, the mix keeps the source's labels;
    a run of another stage is refused by name."""
    from sdeseg.report import ssda_figures, ssda_run_files

    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=1"), tmp_path / "run")
    info = ssda_figures(tmp_path / "run", tmp_path / "fig", n=2)
    crit = torch.tensor(info["criterion"])
    assert crit.shape == (2, 3) and (crit >= 0).all()  # 2 targets, the run's 3 candidates
    assert info["chosen"] == crit.argmin(1).tolist()
    assert all(r != c for r, c in zip(info["random"], info["chosen"]))
    assert 0.0 < info["source_share"] < 1.0
    assert all((tmp_path / "fig" / f).stat().st_size > 5_000 for f in ("geometry.png", "cross_mix.png"))
    semi = tmp_path / "semi"
    run_in_process(tiny_config("demo_semiseg", synthetic_root, f"semiseg.sde_checkpoint={exports['city']}",
                               "train.steps=1"), semi)
    with pytest.raises(ConfigError, match="stage 'semiseg', not a domain-adaptation run"):
        ssda_run_files(semi)
    from sdeseg.cli import main

    out = tmp_path / "demo"  # the demo refuses it before generating data or training
    assert main(["demo", "--out", str(out), "--data", synthetic_root, "--ssda-run", str(semi)]) == 2
    assert not out.exists()


def test_source_plus_target_supervised_row_has_no_target_pseudo_labels(synthetic_root, game_root, exports, tmp_path):
    """The ablation's base row: semiseg.pseudo_label=false drops the within-target term (it was
    ignored by this stage before), cross_mix=false the cross-domain one; the source loss stays."""
    cfg = _ssda(synthetic_root, game_root, exports, "train.steps=2", "semiseg.pseudo_label=false",
                "ssda.cross_mix=false", "ssda.mgs_candidates=1")
    run_in_process(cfg, tmp_path)
    train = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert train and all(r["seg/source"] > 0 and r["seg/sup"] > 0 for r in train)
    assert not any(k in r for r in train for k in ("seg/unsup", "seg/cross", "seg/confident"))
    assert all(r["seg/total"] == pytest.approx(r["seg/sup"] + r["seg/source"], rel=1e-5) for r in train)


def test_multitask_adds_the_photometric_loss_on_target_sequences(synthetic_root, game_root, exports, tmp_path):
    """The official full setting: with model.multitask=true the target stream carries sequences
    and the photometric loss joins the total; the pose net trains at its own optim.pose_lr while
    the encoder and heads keep theirs; source batches stay single game frames."""
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=2", "model.multitask=true",
                         "optim.pose_lr=1e-6", "optim.lr=1e-3", "optim.encoder_lr=1e-4"), tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["depth/total"] > 0 and r["seg/cross"] > 0 for r in train)
    terms = ("seg/sup", "seg/aux", "seg/source", "seg/unsup", "seg/cross", "depth/total")
    assert all(r["seg/total"] == pytest.approx(sum(r[k] for k in terms if k in r), rel=1e-5) for r in train)
    assert all((r["lr/pose"], r["lr/encoder"], r["lr/heads"]) == pytest.approx((1e-6, 1e-4, 1e-3)) for r in train)
    keys = [r["keys"] for r in records if r["kind"] == "keys"]
    assert keys and all(k.startswith("synth-game/") for step_keys in keys for k in step_keys[4:])


@pytest.mark.parametrize("weighting", ["fraction", "class"])
def test_cross_mix_weighs_target_pixels_as_the_pseudo_label_loss_does(synthetic_root, game_root, exports, tmp_path,
                                                                      monkeypatch, weighting):
    """semiseg.pseudo_weighting reaches the cross-domain term's target pixels: the paper's one
    confident fraction per batch, or the class-balanced per-pixel weights."""
    from sdeseg.losses import pseudo_label_weight
    from sdeseg.stages import ssda

    seen, real = [], ssda.cross_domain_depth_mix

    def spy(*args, **kwargs):
        seen.append((args[5], kwargs["target_weight"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssda, "cross_domain_depth_mix", spy)
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=2", f"semiseg.pseudo_weighting={weighting}",
                         "semiseg.pseudo_class_share=0.3"), tmp_path)
    assert len(seen) == 2
    for probs, weight in seen:
        assert weight.shape == (probs.shape[0], *probs.shape[2:])
        confident = (probs.max(1).values >= 0.968).float()  # the preset's threshold
        if weighting == "fraction":
            assert torch.equal(weight, confident.mean().expand_as(weight))
        else:
            assert torch.equal(weight, pseudo_label_weight(probs, 0.968, "class", 0.3)[0])
            assert set(weight.unique().tolist()) <= {0.0, 1.0}
            # a 2-step model is unsure everywhere: each class still keeps its top 30%
            assert confident.mean() < 0.3 <= weight.mean()


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_cross_target_weight_scales_only_the_target_pixels_of_the_mix(synthetic_root, game_root, exports, tmp_path,
                                                                       monkeypatch, scale):
    """ssda.cross_target_weight multiplies the target pixels' pseudo-label weight in the cross-domain
    mix; its pasted source pixels keep weight 1 (0: the mix supervises only the source paste)."""
    from sdeseg.stages import ssda

    seen, real = [], ssda.cross_domain_depth_mix

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args[5], out))
        return out

    monkeypatch.setattr(ssda, "cross_domain_depth_mix", spy)
    summary = run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=2",
                                   f"ssda.cross_target_weight={scale}", "semiseg.pseudo_threshold=0"), tmp_path)
    assert len(seen) == 2 and summary["steps"] == 2
    for probs, out in seen:
        # the paper's weight, one confident fraction per batch: every pixel counts at threshold 0 (a
        # 2-step teacher reaches the preset's 0.968 nowhere, which would hide the scale)
        fraction = (probs.max(1).values >= 0).float().mean()
        assert fraction == 1
        source = out.mask[:, 0]
        assert source.any() and (~source).any()
        assert torch.equal(out.weight[source], torch.ones_like(out.weight[source]))
        target = out.weight[~source]
        assert torch.equal(target, (fraction * scale).expand_as(target))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["seg/cross"] > 0 for r in records if r["kind"] == "train")  # the source paste still trains


def test_mix_use_gt_gives_the_mixes_ground_truth_of_labeled_images_met_in_the_stream(
        synthetic_root, game_root, exports, tmp_path, monkeypatch):
    """semiseg.mix_use_gt (the official mix_use_gt): an unlabeled-stream image of the labeled set
    enters the pool, and so both mixes, with its one-hot ground truth; every other image keeps
    the teacher's probabilities, and no other image's label is read."""
    import dataclasses

    from sdeseg.data.labeled import labeled_keys_for
    from sdeseg.mixing import labels_to_probs
    from sdeseg.stages import ssda

    cfg = _ssda(synthetic_root, game_root, exports, "train.steps=4", "semiseg.mix_use_gt=true",
                "data.num_labeled=12")
    labeled = set(labeled_keys_for(cfg.data))
    pools, crossed, real_pool, real_cross = [], [], ssda.teacher_pool, ssda.cross_domain_depth_mix

    def spy_pool(teacher, depth_net, lb, ub, cfg, autocast):
        pool = real_pool(teacher, depth_net, lb, ub, cfg, autocast)
        plain = real_pool(teacher, depth_net, lb, dataclasses.replace(ub, label=None), cfg, autocast)
        pools.append((list(ub.keys), ub.label, pool.probs, plain.probs))
        return pool

    def spy_cross(*args, **kwargs):
        crossed.append(args[5])
        return real_cross(*args, **kwargs)

    monkeypatch.setattr(ssda, "teacher_pool", spy_pool)
    monkeypatch.setattr(ssda, "cross_domain_depth_mix", spy_cross)
    run_in_process(cfg, tmp_path)
    assert len(pools) == len(crossed) == 4
    met = 0
    for (keys, label, probs, plain), cross_probs in zip(pools, crossed):
        n = len(keys)
        torch.testing.assert_close(cross_probs, probs[:n], rtol=0, atol=0)
        torch.testing.assert_close(probs[n:], plain[n:], rtol=0, atol=0)  # the labeled batch: as without
        for i, key in enumerate(keys):
            if key in labeled:
                met += 1
                assert (label[i] != 255).any()
                assert torch.equal(probs[i], labels_to_probs(label[i:i + 1], probs.shape[1])[0])
            else:
                assert label is None or (label[i] == 255).all()
                assert torch.equal(probs[i], plain[i])
    assert 0 < met < 4 * 2  # both kinds of image were met


@pytest.mark.parametrize("match", ["median", "official"])
def test_teacher_and_target_sde_see_each_target_batch_once_per_step(synthetic_root, game_root, exports, tmp_path,
                                                                   monkeypatch, match):
    """The within-target mix, the geometry match and the cross-domain mix read one pool: per
    micro-batch one teacher forward, one target-SDE forward (unlabeled + labeled images), one
    source-SDE forward over all candidates."""
    from collections import Counter

    from sdeseg.stages import ssda

    calls, real = [], ssda.train_step

    def counted(engine, teacher, target_net, source_depth, lb, ub, src, *args, **kwargs):
        seen = Counter()

        def counting_teacher(x):
            seen["teacher", x.shape[0]] += 1
            return teacher(x)

        hooks = [net.register_forward_hook(lambda m, i, o, name=name: seen.update([(name, i[0].shape[0])]))
                 for name, net in (("target", target_net), ("source", source_depth.net))]
        try:
            return real(engine, counting_teacher, target_net, source_depth, lb, ub, src, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            calls.append((dict(seen), len(lb), len(ub), len(src)))

    monkeypatch.setattr(ssda, "train_step", counted)
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=2", f"ssda.match={match}"), tmp_path)
    assert len(calls) == 2
    for seen, n_lab, n_unl, n_src in calls:
        assert seen == {("teacher", n_unl): 1, ("target", n_unl + n_lab): 1, ("source", n_src): 1}


@pytest.mark.parametrize("match", ["median", "official"])
def test_geometry_criterion_from_the_pool_depth_equals_the_networks(synthetic_root, game_root, exports, match):
    """Matching on the pool's target depth (the step's one target-SDE forward) picks as matching
    on a forward of its own: the criterion agrees (official: through the disparity it is
    recovered from)."""
    from contextlib import nullcontext

    from sdeseg.data.reader import ShardStream
    from sdeseg.stages.ssda import SourceDepth, frozen_depth_net, geometry_criterion

    cfg = _ssda(synthetic_root, game_root, exports, f"ssda.match={match}")
    target_net = frozen_depth_net(exports["city"], "cpu")
    target = next(iter(ShardStream(synthetic_root, batch_size=2, crop=(32, 64), frames=(0,), num_workers=0)))
    src = next(iter(ShardStream(game_root, batch_size=6, crop=(32, 64), frames=(0,), num_workers=0)))
    source_depth = SourceDepth(cfg, "cpu")
    own, s_own, t_own = geometry_criterion(target.images[0], src, target_net, source_depth, cfg, nullcontext)
    pool_depth = target_net.depth_range.depth(target_net(target.images[0])[("disp", 0)])
    given, s_given, t_given = geometry_criterion(target.images[0], src, target_net, source_depth, cfg, nullcontext,
                                                 pool_depth)
    assert own.shape == (2, 3)
    torch.testing.assert_close(given, own, rtol=1e-4, atol=1e-6)
    assert torch.equal(given.argmin(1), own.argmin(1))
    torch.testing.assert_close(t_given, t_own)


@pytest.fixture(scope="module")
def game_depth(game_root, exports, tmp_path_factory) -> str:
    """The game SDE export's depth over the game images, as a derived dataset."""
    from sdeseg.infer import infer_dataset

    out = str(tmp_path_factory.mktemp("game_depth") / "depth")
    infer_dataset(exports["game"], game_root, out, outputs=["depth"], batch_size=4)
    return out


def test_stored_source_depth_matches_the_network_on_the_batch(synthetic_root, game_root, exports, game_depth):
    """ssda.source_depth_root: the stored depth of the full images, cropped and flipped as the
    batch was, is the depth the source network gives the batch's own (here uncropped) images;
    flipped samples are compared with the network's depth of the image flipped back."""
    from contextlib import nullcontext

    from sdeseg.data.reader import ShardStream
    from sdeseg.infer import DEPTH_MEMBER
    from sdeseg.stages.ssda import SOURCE_DEPTH, SourceDepth

    cfg = _ssda(synthetic_root, game_root, exports, f"ssda.source_depth_root={game_depth}")
    stream = ShardStream(game_root, batch_size=12, crop=(32, 64), augment=cfg.data.augment, frames=(0,),
                         num_workers=0, seed=3, derived={SOURCE_DEPTH: (game_depth, DEPTH_MEMBER)})
    batch = next(iter(stream))
    flip = batch.geometry[:, 4].bool()
    assert flip.any() and not flip.all()  # both kinds in the batch
    stored = SourceDepth(cfg, "cpu")
    assert stored.net is None  # no source network at all
    disp, depth = stored(batch, nullcontext)
    online = SourceDepth(cfg, "cpu", online=True)
    unflipped = batch.images[0].clone()
    unflipped[flip] = unflipped[flip].flip(-1)
    batch.images[0] = unflipped
    want_disp, want = online(batch, nullcontext)
    want[flip], want_disp[flip] = want[flip].flip(-1), want_disp[flip].flip(-1)
    assert depth.shape == want.shape == (12, 1, 32, 64)
    torch.testing.assert_close(depth, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(disp, want_disp, rtol=1e-4, atol=1e-5)


def test_stage_with_stored_source_depth_trains_and_refuses_other_depth(synthetic_root, game_root, exports,
                                                                      game_depth, tmp_path):
    """The stage reads the stored depth; depth of another export, of other images, or no depth
    at all is refused before workers start, naming the setting."""
    from sdeseg.infer import infer_dataset

    cfg = _ssda(synthetic_root, game_root, exports, "train.steps=2", f"ssda.source_depth_root={game_depth}")
    summary = run_in_process(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["seg/cross"] > 0 and 0 < r["ssda/source_share"] < 1 for r in train if r["kind"] == "train")
    wrong_model = str(tmp_path / "city_model")
    infer_dataset(exports["city"], game_root, wrong_model, outputs=["depth"])
    with pytest.raises(ConfigError, match=r"ssda.source_depth_root: .* not with ssda.source_sde_checkpoint"):
        preflight(_ssda(synthetic_root, game_root, exports, f"ssda.source_depth_root={wrong_model}"))
    wrong_images = str(tmp_path / "city_images")
    infer_dataset(exports["game"], synthetic_root, wrong_images, outputs=["depth"], split="val")
    with pytest.raises(ConfigError, match=r"has no depth for 12 of the 12 source samples"):
        preflight(_ssda(synthetic_root, game_root, exports, f"ssda.source_depth_root={wrong_images}"))
    features = str(tmp_path / "features")
    infer_dataset(exports["game"], game_root, features, outputs=["features"])
    with pytest.raises(ConfigError, match=r"holds \['features'\], no depth"):
        preflight(_ssda(synthetic_root, game_root, exports, f"ssda.source_depth_root={features}"))
    with pytest.raises(ConfigError, match="ssda.source_depth_root: .*derived.json does not exist"):
        preflight(_ssda(synthetic_root, game_root, exports, f"ssda.source_depth_root={game_root}"))


def test_ssda_resumes_exactly(synthetic_root, game_root, exports, tmp_path):
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=6"), tmp_path / "a")
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=3"), tmp_path / "b")
    run_in_process(_ssda(synthetic_root, game_root, exports, "train.steps=6"), tmp_path / "b")
    a, b = _teacher(tmp_path / "a", 6), _teacher(tmp_path / "b", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    keys = [[r["keys"] for r in log if r["kind"] == "keys"] for log in logs]
    assert keys[0] == keys[1] and len(keys[0]) == 6  # the same target and source samples at every step


def test_bad_source_input_is_refused_before_workers_start(synthetic_root, game_root, exports, tmp_path):
    with pytest.raises(ConfigError, match="ssda.source_sde_checkpoint"):
        preflight(_ssda(synthetic_root, game_root, exports, "ssda.source_sde_checkpoint=null"))
    with pytest.raises(ConfigError, match=r"ssda.source_sde_checkpoint: file .*missing.pt does not exist"):
        preflight(_ssda(synthetic_root, game_root, exports, f"ssda.source_sde_checkpoint={tmp_path}/missing.pt"))
    with pytest.raises(ConfigError, match="model.num_classes=5"):
        preflight(_ssda(synthetic_root, game_root, exports, "model.num_classes=5"))
    with pytest.raises(ConfigError, match="no source samples"):
        preflight(_ssda(synthetic_root, game_root, exports, "ssda.source_domain=elsewhere"))
    unlabeled = tmp_path / "unlabeled"
    shutil.copytree(game_root, unlabeled)
    table = pq.read_table(unlabeled / "manifest.parquet").to_pylist()
    for row in table[:3]:
        row["has_label"] = False
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), unlabeled / "manifest.parquet")
    with pytest.raises(ConfigError, match="3 of 12 source samples .* have no label"):
        preflight(_ssda(synthetic_root, str(unlabeled), exports))


def test_the_study_tool_runs_rows_scores_the_source_model_on_the_target_and_resumes(
        synthetic_root, game_root, exports, tmp_path):
    """tune.ssda_study on the tiny domains: three rows of one seed, the source-only model scored
    on the target's test split, the multi-task full row, a table of what ran; a second call
    trains nothing again."""
    from tune.ssda_study import main

    args = ["--target", synthetic_root, "--target-sde", exports["city"], "--source", game_root,
            "--source-sde", exports["game"], "--out", str(tmp_path), "--seeds", "0", "--labels", "4",
            "--steps", "2", "--rows", "full", "srctgt", "sourceonly", "fullmt", "--overrides", *TINY,
            "--source-overrides", "data.test_split=null", "data.val_split=train"]
    assert main(args) == 0
    full = json.loads((tmp_path / "full_s0" / "summary.json").read_text())
    assert full["steps"] == 2
    score = json.loads((tmp_path / "sourceonly_s0" / "eval_target_test.json").read_text())
    assert score["samples"] == 8 and score["data"] == synthetic_root  # the target's 8 test samples
    table = (tmp_path / "ssda.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| (5) full"))
    assert f"{100 * full['test/seg/miou']:.2f} ({100 * full['seg/miou']:.2f})" in line
    assert f"{100 * score['seg/miou']:.2f}" in next(x for x in table.splitlines() if x.startswith("| (G)"))
    assert "| (3) + within-target DepthMix | not run |" in table
    assert "- full − srctgt: **" in table and "full − within" not in table
    assert "final model (the run's own `val` in brackets; for (G), its source `val`), after 2 steps." in table
    assert "| (5) full (+ Matching Geometry Sampling) |" in table and ", multi-task" not in line
    mt = json.loads((tmp_path / "fullmt_s0" / "summary.json").read_text())
    assert yaml.safe_load((tmp_path / "fullmt_s0" / "config.yaml").read_text())["model"]["multitask"] is True
    mt_line = next(x for x in table.splitlines() if x.startswith("| (6) full, multi"))
    assert f"{100 * mt['test/seg/miou']:.2f}" in mt_line
    assert f"- fullmt − full: **{100 * (mt['test/seg/miou'] - full['test/seg/miou']):+.2f}**" in table
    assert "![Matching Geometry Sampling" in table and "(geometry.png)" in table and "(cross_mix.png)" in table
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("geometry.png", "cross_mix.png"))
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*_s0/summary.json")}
    assert len(stamps) == 4 and main(args) == 0
    assert {p: p.stat().st_mtime for p in tmp_path.glob("*_s0/summary.json")} == stamps
    # a row trained multi-task through --overrides says so in the table
    mt_args = [*args[:args.index("--rows") + 1], "srctgt", "--overrides", *TINY, "model.multitask=true",
               *args[args.index("--source-overrides"):]]
    mt_args[mt_args.index("--out") + 1] = str(tmp_path / "mt")
    assert main(mt_args) == 0
    mt_table = (tmp_path / "mt" / "ssda.md").read_text()
    assert "| (2) source + target supervised, multi-task |" in mt_table
