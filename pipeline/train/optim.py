"""Optimizer and learning-rate schedule of the official recipe: AdamW, linear warm-up, linear decay to 0.

(GSVA uses DeepSpeed's WarmupDecayLR: lr rises linearly from 0 over ``warmup_steps``, then falls
linearly to 0 at the last step.) The schedule is a pure function of (step, lr, warm-up, max steps) set
before every update, so its whole state is the step saved in the checkpoint, and a resumed run that
changes ``--max-steps`` or ``--lr`` simply continues on the new line.
"""

from __future__ import annotations

import torch

from pipeline.train.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max_steps - step
    return max(0.0, remaining / max(1, max_steps - warmup_steps))


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters: check the trainable policy")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Set every group's lr for the update made at ``step``; returns it."""
    lr = cfg.lr * lr_factor(step, cfg.warmup_steps, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def schedule_state(cfg: OptimConfig, max_steps: int) -> dict:
    """What defines the schedule, saved with the checkpoint for the record."""
    return {"kind": "warmup-linear-decay", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "max_steps": max_steps}
