"""Stage: semi-supervised domain adaptation — few target labels plus a labeled synthetic source.

The extension paper's setting (``../shared/METHODS.md``, "Semi-supervised domain adaptation"):
the semi-supervised stage (mean teacher, within-target DepthMix, transfer from the target's
SDE export) plus, per micro-batch, ``ssda.mgs_candidates`` source images per unlabeled target
image. Matching Geometry Sampling keeps, per target, the candidate whose depth map (the
source's own SDE export) is closest to the target's (:func:`sdeseg.mixing.match_geometry`);
the matched source batch gives a supervised source loss and is pasted over the targets where
it is closer (Cross-Domain DepthMix, :func:`sdeseg.mixing.cross_domain_depth_mix`): source
ground truth with weight 1, target pseudo-labels weighted as ``semiseg.pseudo_weighting`` says
(the paper: the teacher's confident fraction). With
``ssda.mgs_candidates=1`` the pairing is random (the ablation's "random pairing");
``semiseg.pseudo_label=false`` drops the within-target term and ``ssda.cross_mix=false`` the
cross-domain one (with both: source + target supervised, the ablation's base row).
With ``model.multitask=true`` (the official full setting) the target stream carries sequences
and the photometric loss on them is added, as in the semi-supervised stage; source frames are
single images and have none. Everything else — optimizer steps, EMA teacher, validation on the
target, exports, exact resume — is the semi-supervised stage's, reused from
``sdeseg.stages.semiseg``.
"""

from __future__ import annotations

import time

import torch

from sdeseg.config import Config, ConfigError, SsdaConfig
from sdeseg.data.derived import DerivedDataset
from sdeseg.data.labeled import labeled_keys_for
from sdeseg.data.manifest import DatasetError
from sdeseg.data.shardio import ShardIndex
from sdeseg.exports import load_depth_model, read_export
from sdeseg.infer import DEPTH_MEMBER
from sdeseg.losses.seg import pixel_cross_entropy, pseudo_label_seg_loss, pseudo_label_weight, supervised_seg_loss
from sdeseg.mixing import cross_domain_depth_mix, geometry_distance, strong_augment
from sdeseg.models import DepthRange, EMATeacher
from sdeseg.optim import param_groups
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState
from sdeseg.stages import semiseg
from sdeseg.stages.semiseg import (
    SEG_KEYS,
    build_models,
    check_labels,
    finish,
    mix_pool,
    photometric_terms,
    teacher_pool,
    validate_and_save,
)

SOURCE_DEPTH = "source_depth"  # the source batches' field of stored depth (Batch.derived)


def preflight(cfg: Config) -> None:
    """The semi-supervised checks plus the source: labeled samples of its split, its SDE export."""
    semiseg.preflight(cfg)
    s = cfg.ssda
    root = s.source_root or cfg.data.root
    index = ShardIndex.load(root)
    rows = [r for r in index.rows.values()
            if r["split"] == s.source_split and (s.source_domain is None or r["domain"] == s.source_domain)]
    where = f"{root} (split {s.source_split!r}{f', domain {s.source_domain!r}' if s.source_domain else ''})"
    if not rows:
        raise ConfigError(f"ssda.source_root: no source samples in {where}")
    if not all(r["has_label"] for r in rows):
        raise ConfigError(f"ssda.source_root: {sum(not r['has_label'] for r in rows)} of {len(rows)} source samples "
                          f"in {where} have no label; the source domain must be fully labeled")
    if s.source_domain is None and cfg.data.domain is None and root == cfg.data.root:
        raise ConfigError("ssda.source_domain: source and target share data.root: name the source's domain "
                          "(e.g. synth-game) and the target's (data.domain, e.g. synth-city)")
    if not s.source_sde_checkpoint:
        raise ConfigError("ssda.source_sde_checkpoint: the source's own SDE export gives its depth (Matching "
                          "Geometry Sampling, Cross-Domain DepthMix); set it to the target's export "
                          f"({cfg.semiseg.sde_checkpoint}) only as the documented weaker fallback")
    read_export(s.source_sde_checkpoint, "sde")
    if s.source_depth_root:
        check_source_depth(s.source_depth_root, s.source_sde_checkpoint, rows)


def check_source_depth(root: str, export_path: str, rows: list[dict]) -> None:
    """``ssda.source_depth_root`` must be depth from the source's own SDE export (the same
    file, by digest) for every source sample, at the images' stored size."""
    from sdeseg.infer import file_digest

    try:
        derived = DerivedDataset(root)
    except (DatasetError, FileNotFoundError) as e:
        raise ConfigError(f"ssda.source_depth_root: {e}") from e
    settings = derived.info.get("settings", {})
    if "depth" not in settings.get("outputs", []):
        raise ConfigError(f"ssda.source_depth_root: {root} holds {settings.get('outputs')}, no depth "
                          f"(sdeseg infer --model {export_path} --data <source> --out {root} --outputs depth)")
    if settings.get("model_digest") != file_digest(export_path):
        raise ConfigError(f"ssda.source_depth_root: {root} was made with {settings.get('model')}, not with "
                          f"ssda.source_sde_checkpoint={export_path} (another file)")
    if settings.get("size") is not None:
        raise ConfigError(f"ssda.source_depth_root: {root} was made at a working size {settings['size']}; make it at "
                          "the images' own size (no --size)")
    try:
        derived.check_covers(rows, "depth", of="source samples")
    except DatasetError as e:
        raise ConfigError(f"ssda.source_depth_root: {e}") from e


class SourceDepth:
    """The source candidates' SDE depth: the source export's network run on each batch, or, with
    ``ssda.source_depth_root``, that network's depth of the full stored images, which the source
    stream's reader joins to each batch cropped and flipped as its images (``batch.derived``,
    see :func:`source_stream`): no source forward pass and no read in the training step.
    ``online=True`` ignores the derived dataset."""

    def __init__(self, cfg: Config, device, online: bool = False):
        s = cfg.ssda
        self.stored = bool(s.source_depth_root) and not online
        self.net = None if self.stored else frozen_depth_net(s.source_sde_checkpoint, device)
        self.depth_range = (self.net.depth_range if self.net is not None else
                            DepthRange.from_dict(read_export(s.source_sde_checkpoint, "sde")["depth_range"]))

    @torch.no_grad()
    def __call__(self, batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmoid disparity, depth) of ``batch``'s centre frames, each (N,1,h,w) float32."""
        if not self.stored:
            with autocast():
                disp = self.net(batch.images[0])[("disp", 0)].float()
            return disp, self.depth_range.depth(disp)
        depth = batch.derived[SOURCE_DEPTH].float().unsqueeze(1)
        return self.depth_range.sigmoid(depth), depth


def source_stream(cfg: Config, ctx: StageContext):
    """This rank's endless source batches: ``ssda.mgs_candidates`` labeled candidates per target
    image, with their stored depth (``batch.derived[SOURCE_DEPTH]``) when ``ssda.source_depth_root``
    is set."""
    s = cfg.ssda
    derived = {SOURCE_DEPTH: (s.source_depth_root, DEPTH_MEMBER)} if s.source_depth_root else None
    return ctx.train_stream(frames=(0,), labels=True, root=s.source_root or cfg.data.root, domain=s.source_domain,
                            split=s.source_split, batch_size=cfg.data.batch_size * s.mgs_candidates,
                            derived=derived)


@torch.no_grad()
def geometry_criterion(target_images, src, target_net, source_depth: SourceDepth, cfg: Config, autocast,
                       target_depth: torch.Tensor | None = None):
    """Matching Geometry Sampling's criterion (B,K) of each of the B targets' K = len(src)/B
    candidates (candidates of target i: rows i*K .. i*K+K-1 of the source batch ``src``), the
    source depth (B*K,1,H,W) and the target depth (B,1,H,W), each from its domain's SDE network
    (the target's given as ``target_depth`` when the step already has it)."""
    s = cfg.ssda
    if target_depth is None:
        with autocast():
            t_disp = target_net(target_images)[("disp", 0)].float()
        t_depth = target_net.depth_range.depth(t_disp)
    else:
        t_depth = target_depth
        t_disp = target_net.depth_range.sigmoid(t_depth) if s.match == "official" else None
    s_disp, s_depth = source_depth(src, autocast)
    return match_criterion(t_depth, s_depth, s, t_disp, s_disp), s_depth, t_depth


def match_criterion(t_depth: torch.Tensor, s_depth: torch.Tensor, s: SsdaConfig,
                    t_disp: torch.Tensor | None = None, s_disp: torch.Tensor | None = None) -> torch.Tensor:
    """The (B,K) criterion of B targets (depth (B,1,H,W)) against K source candidates each
    (depth (B*K,1,H,W), target i's in rows i*K .. i*K+K-1), with ``ssda.ignore_top/bottom``'s
    rows left out; ``ssda.match=official`` compares the raw disparities ``t_disp``, ``s_disp``
    (same shapes) instead."""
    b, h = t_depth.shape[0], t_depth.shape[-2]
    top, bottom = int(round(s.ignore_top * h)), int(round(s.ignore_bottom * h))
    t, source = (t_disp, s_disp) if s.match == "official" else (t_depth, s_depth)  # official: raw disparities
    return geometry_distance(t[:, 0], source.view(b, -1, *source.shape[-2:]), top, bottom, mode=s.match)


def matched_source(src, ub, target_net, source_depth: SourceDepth, cfg: Config, autocast,
                   target_depth: torch.Tensor | None = None):
    """(indices of the matched candidates in ``src``, their depth (B,1,H,W), the targets' depth);
    with one candidate and no Cross-Domain DepthMix no depth is needed: (indices, None, None).
    The match is :func:`sdeseg.mixing.match_geometry`'s (the first smallest criterion)."""
    b, k = ub.images[0].shape[0], cfg.ssda.mgs_candidates
    if k == 1 and not cfg.ssda.cross_mix:
        return torch.arange(b, device=ub.images[0].device), None, None
    criterion, s_depth, t_depth = geometry_criterion(ub.images[0], src, target_net, source_depth, cfg, autocast,
                                                     target_depth)
    pick = torch.arange(b, device=criterion.device) * k + criterion.argmin(dim=1)
    return pick, s_depth[pick], t_depth


def train_step(engine, teacher, target_net, source_depth: SourceDepth, lb, ub, src, cfg: Config,
               gen: torch.Generator, step: int, autocast) -> dict:
    """Forward and backward of one micro-batch; returns detached loss terms and statistics.

    The teacher and the target's SDE network see the target images once per micro-batch
    (:func:`sdeseg.stages.semiseg.teacher_pool`): the within-target mix, the geometry match
    and the cross-domain mix all read that pool."""
    s, ss = cfg.semiseg, cfg.ssda
    engine.train()
    n = ub.images[0].shape[0]
    pool = teacher_pool(teacher, target_net, lb, ub, cfg, autocast) if s.pseudo_label or ss.cross_mix else None
    sde_depth = pool is not None and s.mix == "depthmix" and s.mix_depth == "pseudo"  # the target SDE's, reusable
    pick, src_depth, tgt_depth = matched_source(src, ub, target_net, source_depth, cfg, autocast,
                                                pool.depth[:n] if sde_depth else None)
    src_images, src_label = src.images[0][pick], src.label[pick]
    terms, stats = {}, {}
    n_lab = lb.images_aug[0].shape[0]
    out = engine(lb.images_aug[0])
    terms |= supervised_seg_loss({k: out[k][:n_lab] for k in SEG_KEYS if k in out}, lb.label, s).terms
    src_out = engine(src.images_aug[0][pick])
    terms["seg/source"] = ss.source_weight * supervised_seg_loss({("seg", 0): src_out[("seg", 0)]}, src_label,
                                                                 s).terms["seg/sup"]
    if s.pseudo_label:  # within-target DepthMix (off: source + target supervised, the ablation's base row)
        within = mix_pool(pool, cfg, gen)
        unsup = pseudo_label_seg_loss({("seg", 0): engine(within.image)[("seg", 0)]}, within.probs, s, step,
                                      within.weight)
        terms |= unsup.terms
        stats |= unsup.stats
    if ss.cross_mix:
        target_weight, _ = pseudo_label_weight(pool.probs[:n], s.pseudo_threshold, s.pseudo_weighting,
                                               s.pseudo_class_share)
        cross = cross_domain_depth_mix(src_images, src_depth, src_label, ub.images[0], tgt_depth, pool.probs[:n],
                                       eps=ss.mix_eps, ignore_index=s.ignore_index, generator=gen,
                                       target_weight=target_weight * ss.cross_target_weight)
        image = strong_augment(cross.image, gen, jitter=s.color_jitter, blur=s.blur, hue_space=s.hue_space)
        ce = pixel_cross_entropy(engine(image)[("seg", 0)], cross.label, s.ignore_index)
        terms["seg/cross"] = ss.cross_weight * (ce * cross.weight).mean()
        stats["ssda/source_share"] = cross.mask.float().mean()
    terms |= photometric_terms(engine, ub, cfg)  # the official full setting's multi-task term (model.multitask)
    total = sum(terms.values())
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | {"seg/total": total.detach()} | stats


def frozen_depth_net(path: str, device: torch.device | str):
    """An SDE export's depth network, frozen, on ``device``, with its ``depth_range`` attached."""
    net, depth_range = load_depth_model(read_export(path, "sde"))
    net.requires_grad_(False).to(device)
    net.depth_range = depth_range
    return net


def run(cfg: Config, ctx: StageContext) -> StageResult:
    s, t = cfg.semiseg, cfg.train
    keys = labeled_keys_for(cfg.data)
    pool = ctx.labeled_pool(keys)
    check_labels(cfg, pool)
    model, target_net = build_models(cfg, ctx)
    if target_net is None:  # DepthMix is part of the method: the target's SDE depth is always used
        target_net = frozen_depth_net(s.sde_checkpoint, ctx.device)
    source_depth = SourceDepth(cfg, ctx.device)
    teacher = EMATeacher(model, s.ema_alpha_max)
    engine = ctx.build_engine(model, param_groups(model, cfg.optim))
    teacher.to(ctx.device)
    gen = torch.Generator().manual_seed(t.seed * 1000 + ctx.rank + 1)
    torch.manual_seed(t.seed * 1000 + ctx.rank + 1)
    stream = semiseg.unlabeled_stream(cfg, ctx, keys)
    source = source_stream(cfg, ctx)

    progress = Progress()
    state = TrainState(engine, shared={"progress": progress, "teacher": teacher},
                       per_rank={"labeled": pool, "reader": stream, "source": source, "generator": gen})
    ctx.restore(state)
    first_step = progress.step
    labeled_it, unlabeled_it, source_it = iter(pool), iter(stream), iter(source)
    meter = StepMeter()
    start = time.perf_counter()
    while progress.step < t.steps:
        for _ in range(cfg.runtime.grad_accum):
            t0 = time.perf_counter()
            lb, ub, src = (next(it).to(ctx.device) for it in (labeled_it, unlabeled_it, source_it))
            if src.label is None:
                raise DatasetError(f"ssda: a source batch without labels ({src.keys[:2]}...)")
            data_time = time.perf_counter() - t0
            losses = train_step(engine, teacher, target_net, source_depth, lb, ub, src, cfg, gen, progress.step,
                                ctx.autocast)
            meter.update(losses, len(lb) + len(ub) + len(src), data_time)
            if t.log_keys:
                ctx.log(progress.step + 1, {"keys": list(lb.keys) + list(ub.keys) + list(src.keys)}, kind="keys")
        teacher.update(engine.module, progress.step)  # once per optimizer step
        progress.step += 1
        ctx.end_step(progress.step, meter, engine)

        validate_and_save(engine, teacher, state, cfg, ctx, start)

    return finish(engine, teacher, progress, cfg, ctx, first_step, start, len(keys))
