"""Optimizer and learning-rate schedule from the typed config (plain PyTorch)."""

from __future__ import annotations

import math

import torch

from sdeseg.config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Encoder parameters (``cfg.encoder_lr``), everything else (``cfg.lr``) and, when
    ``cfg.pose_lr`` is set, the pose network's parameters on their own (the extension paper's
    multi-task setting trains its pose net at 1e-6, i.e. keeps the SDE stage's one).

    A parameter belongs to the encoder when a component of its name is ``encoder``
    (e.g. ``depth.encoder.layer1.0.conv1.weight``), to the pose network when its name starts
    with ``pose.``; frozen parameters are left out.
    """
    enc, rest, pose = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.pose_lr is not None and name.split(".")[0] == "pose":
            pose.append(p)
        else:
            (enc if "encoder" in name.split(".") else rest).append(p)
    enc_lr = cfg.encoder_lr if cfg.encoder_lr is not None else cfg.lr
    groups = [{"params": enc, "lr": enc_lr, "name": "encoder"}, {"params": rest, "lr": cfg.lr, "name": "heads"},
              {"params": pose, "lr": cfg.pose_lr, "name": "pose"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based); ``cfg`` is an
    :class:`OptimConfig` or anything with its schedule fields."""
    warm = 1.0 if cfg.warmup_steps == 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.schedule == "step":
        return warm * cfg.gamma ** (step // cfg.step_size)
    if cfg.schedule == "poly":
        return warm * max(0.0, 1.0 - step / max(total, 1)) ** cfg.poly_power
    if cfg.schedule == "cosine":  # after the warm-up, half a cosine from 1 down to 0 at ``total``
        done = max(0, step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    return warm


class LRFactor:
    """``lr_factor`` as a callable object of plain fields: ``LambdaLR.state_dict()`` saves a
    callable object's attributes, so a checkpoint restores the schedule's length too (a stage
    that trains one model per round, each with its own length, resumes with the right one)."""

    def __init__(self, total: int, cfg: OptimConfig) -> None:
        self.total = int(total)
        self.schedule, self.warmup_steps, self.poly_power = cfg.schedule, cfg.warmup_steps, cfg.poly_power
        self.gamma, self.step_size = cfg.gamma, cfg.step_size

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self)  # reads the same fields as an OptimConfig


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(total_steps, cfg))


def assert_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop early with a clear message rather than train on NaN."""
    for k, v in losses.items():
        if not math.isfinite(float(v)):
            raise FloatingPointError(f"loss {k} is {float(v)} at step {step}")
