"""Data parallelism of the GSVA module: DDP (Ray Train's prepare_model) or FSDP2 (torch ``fully_shard``).

- DDP replicates the model on every worker and all-reduces gradients. ``find_unused_parameters`` is on:
  SAM's IoU head and multimask outputs, the prompt encoder's point/box/mask embeddings and (in a batch
  whose expressions are all no-target) the whole mask decoder get no gradient in GSVA.
- FSDP2 shards each transformer block (Llama decoder layers, CLIP encoder layers, SAM ViT blocks) and
  the remaining root parameters over all workers: parameters, gradients and AdamW state take 1/N of the
  memory each, which is what 7B full fine-tuning or 13B need. Ray Train's own ``parallel_strategy="fsdp"``
  is FSDP1 and refuses CPUs; FSDP2 runs on CPU/gloo too, so the same code is tested here.
Precision is the same for both: fp32 master weights and ``torch.autocast`` (bf16 on GPUs).

Checkpoint state is gathered as full (unsharded) state dicts keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), so a run saved with one strategy / world size resumes with
another.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of GSVA, the natural FSDP units (each is called via __call__)."""
    return [*model.language_model.layers, *model.mllm.model.vision_tower.encoder.layers,
            *model.sam.image_encoder.blocks]


def wrap(model: nn.Module, strategy: str, device: torch.device, world_size: int) -> nn.Module:
    """Move to ``device`` and wrap for ``world_size`` workers (unwrapped when alone)."""
    model.to(device)
    if world_size == 1:
        return model
    if strategy == "ddp":
        from ray.train.torch import prepare_model

        return prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                             parallel_strategy_kwargs={"find_unused_parameters": True})
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for block in block_modules(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of an unwrapped replica; a parameter without a gradient counts as 0
    on that worker (every worker must make the same calls, so missing gradients become zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world_size


def unwrap(model: nn.Module) -> nn.Module:
    """The GSVA module itself (DDP keeps it in ``.module``; FSDP2 shards it in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state), unsharded and on CPU, keyed by parameter name. A collective under
    FSDP: every rank must call it; the full dicts are complete on rank 0."""
    if not _distributed():
        return unwrap(model).state_dict(), _plain_optimizer_state(unwrap(model), optimizer)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of ``full_state``'s optimizer half, on every rank (sharding it again under FSDP)."""
    if not _distributed():
        _load_plain_optimizer_state(unwrap(model), optimizer, state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # strict=False: parameters that never received a gradient (SAM's IoU head, CLIP's unused last layer)
    # have no AdamW state to restore.
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(strict=False))


# One process, no process group: the same name-keyed layout as torch.distributed.checkpoint produces
# ({"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}), so checkpoints interchange.
def _plain_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    raw = optimizer.state_dict()
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {ordered[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in raw["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ordered[i] for i in g["params"]]}
              for g in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_plain_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    index = {n: i for i, n in enumerate(order)}
    groups, params = [], [p for g in optimizer.param_groups for p in g["params"]]
    if len(params) != len(order):
        raise ValueError(f"the optimizer holds {len(params)} parameters, the model trains {len(order)}")
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise ValueError(f"optimizer state for parameters this model does not train: {missing[:5]}")
    for g in state["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]})
    optimizer.load_state_dict({"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups})
