"""A training checkpoint: the model in the project's own format plus what resuming needs.

    step-0001500/
      model/            gsva.checkpoint format (config.json, model.safetensors, tokenizer.json): loadable
                        by the annotate job and GSVAPredictor.from_checkpoint; LoRA kept un-merged (its
                        adapter spec is in config.json) so training continues on the same adapters
      train_state.pt    step, epoch, optimizer + scheduler state, metrics history, run starts

Ray Train persists the folder (local or S3) and keeps the last ``num_to_keep``; ``get_checkpoint()``
hands the latest back to a restarted or resumed worker group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
STEP_DIR_FORMAT = "step-{step:07d}"


@dataclass
class TrainState:
    """Everything besides the weights that a resumed run continues from."""

    step: int = 0
    epoch: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per logged step
    starts: list[dict[str, Any]] = field(default_factory=list)  # {"step", "time", "world_size"} per (re)start
    stage_head: dict[str, Any] = field(default_factory=dict)  # a stage's dense head (not in the model)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def step_dir_name(step: int) -> str:
    return STEP_DIR_FORMAT.format(step=step)


def materialize(cfg, state: dict[str, torch.Tensor], lora: bool) -> torch.nn.Module:
    """A real GSVA module from a full state dict (what rank 0 holds after an FSDP gather)."""
    from gsva.checkpoint import assign_weights, empty_model

    return assign_weights(empty_model(cfg, cfg.lora if lora else None), state, torch.float32)


def save(directory: str, model: torch.nn.Module, tokenizer, train_state: TrainState) -> None:
    """Write a checkpoint folder (local ``directory``; Ray Train uploads it)."""
    from gsva.checkpoint import save_checkpoint

    save_checkpoint(model, tokenizer, os.path.join(directory, MODEL_DIR), merge=False)
    torch.save(train_state.to_dict(), os.path.join(directory, STATE_FILE))


def load(directory: str, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, TrainState) from a local checkpoint folder."""
    from gsva.checkpoint import load_checkpoint

    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a training checkpoint: no {STATE_FILE}")
    model, tokenizer, _ = load_checkpoint(os.path.join(directory, MODEL_DIR), device=str(device))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return model, tokenizer, TrainState(**raw)
