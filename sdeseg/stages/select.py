"""Stage: automatic data selection — which training images to label, from self-supervised depth.

The paper's third contribution (``../shared/METHODS.md``, "Automatic data selection"). Rounds
of growing label budgets (``select.budgets``). Round 0: every candidate (the labeled samples
of ``data.train_split``) is scored by the frozen SDE teacher (``select.sde_checkpoint``): its
decoder activation at ``select.feature_level``, pooled and standardised, measures diversity;
the first set is one seeded random image grown by farthest-point sampling on diversity only.
Each later round: a fresh student is trained on the images chosen so far for
``select.steps_before(round)`` optimizer steps — a depth network imitating the teacher's
per-image normalised disparity with a BerHu loss (labels are not used) — then every candidate
is scored again (teacher features, and the student's error: the difficulty), the chosen
images' difficulty is set to 0 and the set grows greedily by diversity + ``difficulty_weight``
× difficulty. Scoring runs on all ranks at once, each over its share of the split, and the
scores are gathered with one all-reduce per round; rank 0's selection is broadcast.

Baselines in the same loop (``select.method``): ``random`` (a seeded draw, nested budgets),
``depth_diversity`` (farthest point on the features only, no student), ``depth_difficulty``
(random first set, then the top difficulty), ``entropy`` (random first set, then a
segmentation student trained on the chosen images' labels ranks candidates by mean
normalised pixel entropy, top ones added).

Outputs (``<run_dir>/selection/``): ``labeled_keys_<n>.json`` per budget (ordered keys and
each pick's diversity and difficulty terms; ``data.labeled_keys=<file>`` of the
semi-supervised stage reads it), ``scores_round<r>.pt`` (every candidate's scores of that
round), ``summary.parquet`` (one row per pick). Shards are never rewritten.

``progress.step`` counts student optimizer steps and one step per selection, so checkpoints
(after each selection, and every ``train.ckpt_every`` student steps) have increasing names.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sdeseg.config import Config, ConfigError
from sdeseg.data.classes import class_names
from sdeseg.data.labeled import labeled_candidates, labeled_keys_for
from sdeseg.exports import load_depth_model, read_export
from sdeseg.losses.distill import disparity_distill_loss
from sdeseg.losses.seg import supervised_seg_loss
from sdeseg.models import build_depth_model, build_seg_model, transfer_from_sde
from sdeseg.optim import param_groups
from sdeseg.runtime import Progress, StageContext, StageResult, StepMeter, TrainState
from sdeseg.selection import (
    bottom_rows_mask,
    depth_difficulty,
    greedy_picks,
    normalise_disparity,
    normalised_entropy,
    pool_features,
    standardise_features,
    top_scores,
)


@dataclass
class SelectionState:
    """Where the selection stands; equal on every rank, saved in every checkpoint."""

    round: int = 0  # index of the next budget to reach
    round_start: int = 0  # progress.step when the current round's student started
    chosen: list[str] = field(default_factory=list)  # keys in pick order
    picks: list[dict[str, Any]] = field(default_factory=list)  # per chosen key: round, diversity, difficulty
    pool: dict[str, Any] = field(default_factory=dict)  # the student's labeled-pool position

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "round_start": self.round_start, "chosen": list(self.chosen),
                "picks": [dict(p) for p in self.picks], "pool": dict(self.pool)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.round_start = int(state["round"]), int(state["round_start"])
        self.chosen, self.picks, self.pool = list(state["chosen"]), list(state["picks"]), dict(state["pool"])


@dataclass
class Scores:
    """Every candidate's scores in one round (rows follow the candidate list)."""

    features: torch.Tensor  # (N, D) standardised teacher features
    difficulty: torch.Tensor  # (N,) depth student error (0 without a depth student)
    entropy: torch.Tensor  # (N,) segmentation student's mean normalised entropy (0 without one)
    class_pixels: torch.Tensor  # (N, C) labeled pixels per class
    count: torch.Tensor  # (N,) how often each candidate was scored: 1 everywhere
    seconds: float  # wall time of the scoring pass


def candidate_keys(cfg: Config) -> list[str]:
    """The images selection may choose: the labeled samples of the training split, sorted."""
    d = cfg.data
    return labeled_candidates(d.root, d.train_split, d.domain)


def preflight(cfg: Config) -> None:
    """Everything this stage can check before a worker starts (the launcher calls it)."""
    s = cfg.select
    if not s.sde_checkpoint:
        raise ConfigError("select.sde_checkpoint: the selection stage needs an SDE export (the frozen teacher, "
                          "<sde run dir>/export/best.pt)")
    read_export(s.sde_checkpoint, "sde")  # a missing file or an export of the wrong kind: one line
    candidates = candidate_keys(cfg)
    if not candidates:
        raise ConfigError(f"data.train_split: no labeled samples of split {cfg.data.train_split!r} in "
                          f"{cfg.data.root}: nothing to select from")
    initial = initial_keys(cfg, candidates)
    if s.budgets[0] <= len(initial):
        raise ConfigError(f"select.budgets: the first budget {s.budgets[0]} does not grow the "
                          f"{len(initial)} keys of data.labeled_keys")
    if s.budgets[-1] > len(candidates):
        raise ConfigError(f"select.budgets: {s.budgets[-1]} is more than the {len(candidates)} candidates "
                          f"(labeled samples of split {cfg.data.train_split!r})")


def initial_keys(cfg: Config, candidates: list[str]) -> list[str]:
    """The set selection grows from: ``data.labeled_keys`` when given (keys already labeled), else none."""
    if cfg.data.labeled_keys is None:
        return []
    keys = labeled_keys_for(cfg.data)
    unknown = sorted(set(keys) - set(candidates))
    if unknown:
        raise ConfigError(f"data.labeled_keys: {len(unknown)} key(s) are not labeled samples of split "
                          f"{cfg.data.train_split!r}, e.g. {unknown[0]!r}")
    return keys


# ----------------------------------------------------------------------------- students


def build_student(cfg: Config, ctx: StageContext, round_index: int, teacher_export: dict):
    """A fresh student engine for ``round_index`` (same initial weights on every rank)."""
    torch.manual_seed(cfg.train.seed * 1000 + round_index)
    if cfg.select.method == "entropy":
        model = build_seg_model(cfg.model)
        if cfg.select.entropy_transfer:
            transfer_from_sde(model, teacher_export["depth"])
    else:
        model = build_depth_model(cfg.model)  # model.pretrained (ImageNet) or scratch, as the official code
    steps = max(cfg.select.steps_before(round_index), 1)
    return ctx.build_engine(model, param_groups(model, cfg.optim), total_steps=steps)


def student_step(engine, teacher, lb, cfg: Config, autocast) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch of the round's student; returns detached terms."""
    s = cfg.select
    engine.train()
    if s.method == "entropy":  # the active-learning baseline's student learns segmentation from the labels
        out = engine(lb.images_aug[0])
        terms, stats = supervised_seg_loss({("seg", 0): out[("seg", 0)]}, lb.label, cfg.semiseg)
        total = terms["seg/sup"]
    else:  # the depth student imitates the teacher's normalised disparity of the same crop
        with torch.no_grad(), autocast():
            target = normalise_disparity(teacher(lb.images[0])[("disp", 0)].float())
        disp = engine(lb.images_aug[0])[("disp", 0)]
        keep = bottom_rows_mask(*disp.shape[-2:], s.loss_ignore_bottom, disp.device)
        terms, stats = disparity_distill_loss(disp, target, keep, s.berhu_c)
        total = terms["distill/berhu"]
    engine.backward(total)
    engine.step()
    return {k: v.detach() for k, v in terms.items()} | stats


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_candidates(teacher, student, candidates: list[str], cfg: Config, ctx: StageContext) -> Scores:
    """Teacher features, student difficulty or entropy and class pixels of every candidate,
    each rank over its share of ``data.train_split`` (full images, no augmentation), gathered
    once. Every rank must call this."""
    s = cfg.select
    start = time.perf_counter()
    row = {k: i for i, k in enumerate(candidates)}
    n, c = len(candidates), cfg.model.num_classes
    channels = teacher.decoder.body.channels[s.feature_level]
    pooled = torch.zeros(n, channels, *s.feature_pool)
    difficulty, entropy, count = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    class_pixels = torch.zeros(n, c)
    teacher.eval()
    if student is not None:
        student.eval()
    for batch in ctx.val_loader(cfg.data.train_split, max_batches=0):
        take = [i for i, k in enumerate(batch.keys) if k in row]
        if not take:
            continue
        rows = torch.tensor([row[batch.keys[i]] for i in take])
        batch = batch.to(ctx.device)
        x = batch.images[0][take]
        with ctx.autocast():
            t_out = teacher(x)
            s_out = student(x) if student is not None else None
        pooled[rows] = pool_features(t_out[("feat", s.feature_level)], s.feature_pool).cpu()
        if s_out is not None and ("disp", 0) in s_out:
            target = normalise_disparity(t_out[("disp", 0)].float())
            difficulty[rows] = depth_difficulty(s_out[("disp", 0)].float(), target, s.far_disp, s.far_dilate,
                                                s.ignore_bottom).cpu()
        if s_out is not None and ("seg", 0) in s_out:
            entropy[rows] = normalised_entropy(F.softmax(s_out[("seg", 0)].float(), dim=1)).cpu()
        if batch.label is not None:
            label = batch.label[take]
            valid = label < c
            for j, r in enumerate(rows.tolist()):
                class_pixels[r] = torch.bincount(label[j][valid[j]], minlength=c)[:c].float().cpu()
        count[rows] += 1
    flat = torch.cat([pooled.flatten(), difficulty, entropy, count, class_pixels.flatten()])
    flat = ctx.all_reduce_sum(flat)  # rows are disjoint across ranks: the sum gathers them
    sizes = [pooled.numel(), n, n, n, n * c]
    parts = torch.split(flat, sizes)
    pooled = parts[0].view_as(pooled)
    missed = int((parts[3] != 1).sum())
    if missed:
        raise RuntimeError(f"scoring covered {n - missed} of {n} candidates exactly once "
                           f"({int((parts[3] == 0).sum())} never, {int((parts[3] > 1).sum())} more than once)")
    return Scores(standardise_features(pooled), parts[1].clone(), parts[2].clone(), parts[4].view(n, c).clone(),
                  parts[3].clone(), time.perf_counter() - start)


# ----------------------------------------------------------------------------- one greedy growth step


def grow(state: SelectionState, scores: Scores | None, candidates: list[str], budget: int, cfg: Config,
         round_index: int) -> list[dict[str, Any]]:
    """The picks that grow ``state.chosen`` to ``budget`` (rank 0 decides; pure given the scores)."""
    s = cfg.select
    index = {k: i for i, k in enumerate(candidates)}
    chosen = [index[k] for k in state.chosen]
    rng = torch.Generator().manual_seed(cfg.train.seed * 7919 + 17)  # the same draws on every call
    random_first = round_index == 0 and s.method in ("random", "entropy", "depth_difficulty")
    if s.method == "random" or random_first:
        order = torch.randperm(len(candidates), generator=rng).tolist()
        new = [i for i in order if i not in set(chosen)][: budget - len(chosen)]
        return [{"key": candidates[i], "round": round_index, "diversity": None, "difficulty": None} for i in new]
    if s.method in ("entropy", "depth_difficulty"):
        score = scores.entropy if s.method == "entropy" else scores.difficulty
        new = top_scores(score, chosen, budget)[len(chosen):]
        return [{"key": candidates[i], "round": round_index, "diversity": None, "difficulty": float(score[i])}
                for i in new]
    picks = []
    if not chosen:  # the first set: one seeded random image, then diversity only
        first = int(torch.randint(len(candidates), (1,), generator=rng))
        chosen = [first]
        picks.append({"key": candidates[first], "round": round_index, "diversity": None, "difficulty": None})
    use_difficulty = s.method == "depth" and round_index > 0
    difficulty = scores.difficulty.clone() if use_difficulty else None
    if difficulty is not None:
        difficulty[chosen] = 0.0  # already selected images are not difficult any more
    for p in greedy_picks(scores.features, difficulty, chosen, budget, s.difficulty_weight):
        picks.append({"key": candidates[p.index], "round": round_index, "diversity": p.diversity,
                      "difficulty": p.difficulty if use_difficulty else None})
    return picks


def set_summary(keys: list[str], scores: Scores, candidates: list[str]) -> dict[str, float]:
    """How a chosen set covers the classes of the whole candidate pool."""
    index = {k: i for i, k in enumerate(candidates)}
    rows = torch.tensor([index[k] for k in keys])
    chosen = scores.class_pixels[rows].sum(0)
    pool = scores.class_pixels.sum(0)
    share, pool_share = chosen / chosen.sum().clamp(min=1), pool / pool.sum().clamp(min=1)
    return {"classes_present": int((chosen > 0).sum()), "classes_in_pool": int((pool > 0).sum()),
            "class_share_l1": float((share - pool_share).abs().sum())}


def write_round(ctx: StageContext, cfg: Config, state: SelectionState, budget: int, scores: Scores | None,
                candidates: list[str], round_index: int) -> None:
    """Rank 0 writes the round's key file, its scores and the running summary table."""
    if not ctx.is_main:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = cfg.select
    keyfile = {"method": s.method, "budget": budget, "round": round_index, "seed": cfg.train.seed,
               "sde_checkpoint": s.sde_checkpoint, "keys": list(state.chosen), "picks": state.picks}
    if scores is not None:
        keyfile["coverage"] = set_summary(state.chosen, scores, candidates)
    ctx.write_output(f"selection/labeled_keys_{budget}.json", json.dumps(keyfile, indent=1).encode())
    if scores is not None:
        buf = io.BytesIO()
        torch.save({"keys": candidates, "features": scores.features, "difficulty": scores.difficulty,
                    "entropy": scores.entropy, "class_pixels": scores.class_pixels, "count": scores.count,
                    "class_names": class_names()}, buf)
        ctx.write_output(f"selection/scores_round{round_index}.pt", buf.getvalue())
    rows = [{"method": s.method, "seed": cfg.train.seed, "order": i, "key": p["key"], "round": p["round"],
             "budget": s.budgets[p["round"]] if p["round"] >= 0 else None,
             "diversity": p["diversity"], "difficulty": p["difficulty"]} for i, p in enumerate(state.picks)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    ctx.write_output("selection/summary.parquet", buf.getvalue())


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config, ctx: StageContext) -> StageResult:
    s, t = cfg.select, cfg.train
    candidates = candidate_keys(cfg)
    export = read_export(s.sde_checkpoint, "sde")
    teacher, _ = load_depth_model(export)
    teacher.requires_grad_(False).to(ctx.device)

    progress, state = Progress(), SelectionState()
    state.chosen = initial_keys(cfg, candidates)
    state.picks = [{"key": k, "round": -1, "diversity": None, "difficulty": None} for k in state.chosen]
    students = s.uses_student and len(s.budgets) > 1
    train_state = None
    if students:  # the next round's fresh student is part of every checkpoint
        train_state = TrainState(build_student(cfg, ctx, 1, export), shared={"progress": progress, "selection": state})
        ctx.restore(train_state)  # the round's student, its optimizer and its schedule (with its length)
    first_step, meter, timings, cached = progress.step, StepMeter(), {}, None
    start = time.perf_counter()

    while state.round < len(s.budgets):
        r, budget = state.round, s.budgets[state.round]
        engine = train_state.engine if train_state is not None and r > 0 else None
        if engine is not None:  # train this round's student on the images chosen so far
            pool = ctx.labeled_pool(state.chosen)
            if state.pool:
                pool.load_state_dict(state.pool)
            batches = iter(pool)
            steps = s.steps_before(r)
            while progress.step - state.round_start < steps:
                for _ in range(cfg.runtime.grad_accum):
                    t0 = time.perf_counter()
                    lb = next(batches).to(ctx.device)
                    data_time = time.perf_counter() - t0
                    losses = student_step(engine, teacher, lb, cfg, ctx.autocast)
                    meter.update(losses, len(lb), data_time)
                progress.step += 1
                ctx.end_step(progress.step, meter, engine)
                done = progress.step - state.round_start
                if t.ckpt_every and done % t.ckpt_every == 0 and done < steps:
                    ctx.sync_buffers(engine.module)
                    state.pool = pool.state_dict()
                    ctx.report(progress.step, {}, train_state)
            ctx.sync_buffers(engine.module)  # every rank scores with one model

        t0 = time.perf_counter()
        if engine is not None or cached is None:  # without a student the scores do not change
            scores = cached = score_candidates(teacher, engine.module if engine is not None else None, candidates,
                                               cfg, ctx)
        picks = ctx.broadcast_object(grow(state, scores, candidates, budget, cfg, r) if ctx.is_main else None)
        state.chosen += [p["key"] for p in picks]
        state.picks += picks
        write_round(ctx, cfg, state, budget, scores, candidates, r)
        cover = set_summary(state.chosen, scores, candidates)
        timings[budget] = cover | {"round_s": time.perf_counter() - t0}
        if scores is not cached or r == 0 or engine is not None:
            timings[budget] |= {"score_s": scores.seconds, "score_img_per_s": len(candidates) / scores.seconds}
        ctx.log(progress.step, {f"select/{k}": v for k, v in cover.items()} | {"select/budget": budget}
                | {f"select/{k}": v for k, v in timings[budget].items()}, kind="val")

        state.round += 1
        progress.step += 1  # the selection is a step of the loop: checkpoint names keep increasing
        state.round_start, state.pool = progress.step, {}
        if train_state is not None and state.round < len(s.budgets):
            train_state.engine = build_student(cfg, ctx, state.round, export)  # fresh for the next round
        if train_state is not None:
            ctx.report(progress.step, {"select/budget": budget} | cover, train_state)

    summary: dict[str, Any] = {"steps": progress.step, "steps_this_run": progress.step - first_step,
                               "wall_time_s": time.perf_counter() - start, "select/method": s.method,
                               "select/candidates": len(candidates)}
    for budget, timing in timings.items():
        summary |= {f"select/{budget}/{k}": v for k, v in timing.items()}
    files = {f"labeled_keys_{b}": str(ctx.run_dir / "selection" / f"labeled_keys_{b}.json") for b in s.budgets}
    return StageResult(summary=summary, exports=files)
