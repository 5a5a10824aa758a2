"""The per-worker training recipe run by Ray Train: setup / train / checkpoint / cleanup.

One step on every worker: ``batch_size`` samples from its data shard -> ``gsva.training.make_batch``
(random GSVA templates, [REJ] for no-target) -> ``training_loss`` (CE + 2 BCE + 0.5 DICE) under autocast
-> backward (DDP all-reduce / FSDP reduce-scatter) -> clip to ``grad_clip`` -> AdamW with the
warm-up/linear-decay lr. Every ``report_every`` steps the loss parts (averaged over workers), lr and
samples/s go to ``ray.train.report``; every ``checkpoint_every`` steps (and at the end) a checkpoint
(pipeline.train.state) goes with the report, and the training curve is rewritten next to it;
validation runs every ``validation_interval`` steps.

Restarts: ``setup`` starts from ``ray.train.get_checkpoint()`` when there is one (a worker-group restart
after a failure, or ``--resume``) and otherwise from ``--init`` / the preset. A resumed run starts a
fresh pass over the data (random order) at the saved step; what was trained after the last checkpoint
is trained again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch

from pipeline.train import parallel, state
from pipeline.train.config import PRETRAINING_STAGES, TrainConfig
from pipeline.train.data import EpochStats, iterate_rows, sample_batches
from pipeline.train.optim import build_optimizer, schedule_state, set_lr
from pipeline.train.stages import build_stage

TRAIN_DATASET, VAL_DATASET = "train", "val"
HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"
LOSS_PARTS = ("loss", "ce", "bce", "dice")
#: Ray Train V2 routes worker prints through logging AND tees them to a wrapped stdout (each line twice):
#: the recipe logs instead.
log = logging.getLogger(__name__)


def initial_model(cfg: TrainConfig):
    """(model, tokenizer) where a new run starts: official release, our checkpoint, the SAM + LLaVA bases,
    or a preset; [SEG]/[REJ] rows then started from words where ``--seg-words``/``--rej-words`` say so."""
    from gsva.token_init import init_rows_from_words

    model, tokenizer = _initial_weights(cfg)
    for token_id, words in ((model.token_ids.seg, cfg.init.seg_words), (model.token_ids.rej, cfg.init.rej_words)):
        if words:
            sources = init_rows_from_words(model.mllm, tokenizer, token_id, words)
            log.info("token %d starts as the mean of %s (ids %s)", token_id, list(words), sources)
    return model, tokenizer


def _initial_weights(cfg: TrainConfig):
    from gsva.checkpoint import combine_bases, load_model
    from gsva.config import preset

    init = cfg.init
    if init.bases:
        model, tokenizer, report = combine_bases(init.sam_base, init.llava_base, cfg.storage)
        log.info("bases combined: %s", report)
        return model, tokenizer
    if init.official:
        from gsva.official import load_official

        model, tokenizer, report = load_official(preset(init.preset), init.checkpoint, init.llava, init.clip,
                                                 init.sam, cfg.storage)
        if report.unexpected:
            log.warning("--init: %d keys of the release were not used, e.g. %s", len(report.unexpected),
                        report.unexpected[:5])
        return model, tokenizer
    model, tokenizer, _ = load_model(init.checkpoint or init.preset, storage=cfg.storage)
    return model, tokenizer


class TrainRecipe:
    """One Ray Train worker's training run; ``run()`` = setup, train, cleanup."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = 0, 1
        self.state = state.TrainState()

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import ray.train

        from gsva.freeze import freeze, has_lora

        cfg = self.cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(cfg.scaling.torch_threads)
        if cfg.scaling.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.autocast_dtype = cfg.autocast_dtype(self.device.type == "cuda")
        torch.manual_seed(cfg.seed)  # identical LoRA init on every worker

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                model, self.tokenizer, self.state = state.load(directory)
        else:
            model, self.tokenizer = initial_model(cfg)
        if cfg.lora_r is not None and not has_lora(model):
            model.cfg = model.cfg.replace(lora=replace(model.cfg.lora, r=cfg.lora_r))
        objects = None
        if cfg.objects:
            from pipeline.train.objects import load_objects

            objects, corrupt = load_objects(cfg.objects, cfg.storage)
            if corrupt:
                log.warning("--objects: %d corrupt entries left out", corrupt)
        self.stage = build_stage(cfg.stage, objects, cfg.dense_weight)
        self.policy = cfg.trainable_policy()
        counts = freeze(model, self.policy, model.cfg.lora)
        if cfg.gradient_checkpointing:
            model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.k = cfg.max_expressions or model.cfg.max_expressions_per_prompt
        model.train()

        # The pretraining stages call parts of the module, not its forward, so DDP's hooks would never
        # arm: they train an unwrapped replica and average gradients themselves (parallel.average_gradients).
        self.sync_gradients = cfg.stage in PRETRAINING_STAGES and self.world > 1
        self.model = parallel.wrap(model, cfg.scaling.strategy, self.device, 1 if self.sync_gradients else self.world)
        self.module = parallel.unwrap(self.model)
        if self.model is not self.module:
            self.model.cfg = self.module.cfg  # gsva.training.training_loss reads model.cfg
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        if self.state.optimizer:
            parallel.load_optimizer_state(self.model, self.optimizer, self.state.optimizer)
        self.state.optimizer = {}
        # A stage's own head (clip's; sam's with --dense-weight) trains beside the model with its own AdamW on
        # the same schedule; pretraining stages average gradients by hand, so it needs no DDP wrapper.
        self.optimizers = [self.optimizer]
        self.trained = list(self.params)
        head = self.stage.make_head(self.module.cfg)
        if head is not None:
            torch.manual_seed(cfg.seed)  # identical head on every worker
            head.to(self.device)
            self.optimizers.append(build_optimizer(list(head.parameters()), cfg.optim))
            if self.state.stage_head:
                head.load_state_dict(self.state.stage_head["weights"])
                self.optimizers[1].load_state_dict(self.state.stage_head["optimizer"])
            self.trained += list(head.parameters())
        self.state.starts.append({"step": self.state.step, "time": time.time(), "world_size": self.world,
                                  "resumed": checkpoint is not None})
        self.train_shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        self.val_shard = ray.train.get_dataset_shard(VAL_DATASET) if cfg.val_data else None
        self._log({"event": "start", "step": self.state.step, "resumed": checkpoint is not None,
                   "policy": self.policy, **counts, "workers": self.world, "strategy": cfg.scaling.strategy,
                   "device": str(self.device), "autocast": str(self.autocast_dtype)})

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg = self.cfg
        while self.state.step < cfg.max_steps:
            stats = EpochStats()
            rng = random.Random(f"{cfg.seed}/{self.rank}/{self.state.epoch}/{self.state.step}")
            shuffle_seed = zlib.crc32(f"{cfg.seed}/{self.rank}/{self.state.epoch}".encode())
            batches = sample_batches(iterate_rows(self.train_shard, cfg.shuffle_buffer, shuffle_seed),
                                     cfg.batch_size, self.k, rng, stats, self.stage.draw)
            stepped = False
            self._last_step_end = time.perf_counter()
            for samples in self._together(batches):
                self._step(samples, rng, stats)
                stepped = True
                if self.state.step >= cfg.max_steps:
                    break
            if not stepped:
                raise ValueError(f"the {cfg.train_split!r} split of {cfg.data} gives fewer than --batch-size "
                                 f"{cfg.batch_size} samples per worker ({stats.images} usable images, "
                                 f"{stats.skipped_images} skipped, {stats.all_rejected} draws all no-target; "
                                 f"first problem: {stats.first_error})")
            if self.state.step < cfg.max_steps:
                self.state.epoch += 1

    def _together(self, batches: Iterator[list]) -> Iterator[list]:
        """Yield batches while EVERY worker has one. Workers draw different numbers of samples per epoch,
        and a worker that started the next epoch alone would wait for the others forever; at the end of
        the shortest shard everyone drains the rest of its epoch and the next epoch starts together."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            if not self._all(batch is not None):
                for _ in iterator:
                    pass
                return
            yield batch

    def _all(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def _step(self, samples: list, rng: random.Random, stats: EpochStats) -> None:
        cfg = self.cfg
        for optimizer in self.optimizers:  # one schedule for the model and a stage's head
            lr = set_lr(optimizer, cfg.optim, self.state.step, cfg.max_steps)
        amp = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with amp:
            parts = self.stage.loss(self.model, self.module, samples, self.tokenizer, rng, cfg.loss, self.device)
        parts.total.backward()
        if self.sync_gradients:
            parallel.average_gradients(self.trained, self.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, cfg.optim.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

        values = torch.stack([parts.total, parts.ce, parts.bce, parts.dice]).detach().float()
        if self.world > 1:
            torch.distributed.all_reduce(values)
            values /= self.world
        now = time.perf_counter()
        record = {"step": self.state.step, "epoch": self.state.epoch, **dict(zip(LOSS_PARTS, values.tolist())),
                  "lr": lr, "grad_norm": float(grad_norm),
                  "samples_per_s": cfg.batch_size * self.world / max(now - self._last_step_end, 1e-9),
                  "skipped_images": stats.skipped_images, "all_rejected_draws": stats.all_rejected}
        self._last_step_end = now
        self._after_step(record)

    def _after_step(self, record: dict[str, Any]) -> None:
        cfg, step = self.cfg, self.state.step
        last = step >= cfg.max_steps
        save = last or step % cfg.checkpoint_every == 0
        validate = self.val_shard is not None and (last or step % cfg.validation_interval == 0)
        if not (save or validate or step % cfg.report_every == 0):
            return
        if validate:
            record.update(self.validate())
        self.state.history.append(record)
        self._log(record)
        if save:
            self.checkpoint(record)
        else:
            import ray.train

            ray.train.report(record)
        self._last_step_end = time.perf_counter()  # reporting / validation / saving is not step time

    # -------------------------------------------------------------------------------------- validation
    def validate(self) -> dict[str, Any]:
        from pipeline.train.validation import unsharded

        started = time.perf_counter()
        with unsharded(self.model):
            out = self.stage.validate(self.module, self.tokenizer, self.val_shard, self.cfg.batch_size,
                                      self.autocast_dtype, self.cfg.max_expressions)
        out["val/seconds"] = time.perf_counter() - started
        return out

    # -------------------------------------------------------------------------------------- checkpoint
    def save_to(self, directory: str) -> None:
        """Write this worker group's checkpoint folder (every rank must call it: FSDP gathers; rank 0 writes)."""
        from gsva.freeze import has_lora

        model_state, optimizer_state = parallel.full_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        module = self.module
        if parallel.is_sharded(self.model):
            module = state.materialize(self.module.cfg, model_state, has_lora(self.module))
        head = self.stage.head
        train_state = state.TrainState(**{**self.state.to_dict(), "optimizer": optimizer_state,
                                          "scheduler": schedule_state(self.cfg.optim, self.cfg.max_steps),
                                          "stage_head": {} if head is None else {
                                              "weights": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                                              "optimizer": self.optimizers[1].state_dict()}})
        state.save(directory, module, self.tokenizer, train_state)

    def checkpoint(self, record: dict[str, Any]) -> None:
        import ray.train

        directory = tempfile.mkdtemp(prefix="gsva-train-ckpt-")
        try:
            self.save_to(directory)
            if self.rank == 0:
                self.publish_curve()
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=state.step_dir_name(self.state.step))
            else:
                ray.train.report(record)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def publish_curve(self) -> None:
        """history.json + training_curve.png in the run folder (next to the step-N checkpoints)."""
        from pipeline.storage import filesystem, join
        from pipeline.train.curve import render

        title = (f"{self.module.cfg.name}, stage {self.cfg.stage} ({self.policy}): {self.world} worker(s), "
                 f"batch {self.cfg.batch_size}/worker, "
                 f"lr {self.cfg.optim.lr}")
        for name, payload in ((HISTORY_FILE, json.dumps(self.state.history).encode()),
                              (CURVE_FILE, render(self.state.history, title))):
            fs, path = filesystem(join(self.cfg.output, name), self.cfg.storage)
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(payload)

    # ----------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Drop the model and optimizer before the worker returns (a restarted group starts clean)."""
        for name in ("optimizers", "optimizer", "trained", "params", "module", "model"):
            self.__dict__.pop(name, None)

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            log.info("train " + json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                            for k, v in record.items()}))

    def run(self) -> None:
        self.setup()
        try:
            self.train()
        finally:
            self.cleanup()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    TrainRecipe(loop_config["config"]).run()
