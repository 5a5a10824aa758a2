"""Ingestion: task shards -> Ray Data (read + decode, streamed) -> per-worker samples and batches.

Driver side, lazily: ``read_tasks(split)`` -> ``randomize_block_order`` -> ``map(decode_row)`` on CPU
tasks (image bytes -> RGB pixels). Ray Train splits the stream across workers (``datasets=``,
``streaming_split(equal=True)``); no dataset is ever loaded whole.

Worker side: each image row becomes one GSVA sample, as in official GSVA: min(K, n) of its n labelled
expressions drawn at random, one conversation (``gsva.training.Sample``). A draw whose expressions are all
no-target is dropped (counted in ``EpochStats.all_rejected``) and the stream's next sample takes its place:
the official loader returns ``self.__getitem__(0)`` for it, which in its (default) random-sampling mode is a
fresh random image, not image 0 (only ``--no_sampling`` would repeat item 0, over-weighting one image).
Every image is offered once per epoch, each time with a fresh choice of its expressions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import masks as rle
from pipeline.images import ImageError, decode_image, read_image_bytes
from pipeline.storage import StorageError, StorageOptions

if TYPE_CHECKING:
    import ray.data

    from gsva.training import Sample

#: CPUs per decode task: differs from the workers' share so the stage never fuses with anything else and
#: several decode tasks fit beside the training workers (ray-facts.md).
DECODE_CPUS = 0.5
#: Image rows fetched from the worker's shard per call (a few batches' worth).
FETCH_ROWS = 32
EMPTY_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
NO_ERROR = ""  # a string, not None: an all-None column would arrive as NaN floats


@dataclass(frozen=True)
class DecodeRow:
    """Ray Data row function: image bytes (embedded or at ``image_uri``) -> ``pixels`` (H, W, 3) uint8.

    An image that cannot be used keeps its row, with empty ``pixels`` and the reason in ``error`` ("" when
    fine): the worker skips and counts it (one bad image must not kill a multi-hour run). An image prepare
    flagged (the shard's ``error``) is never read.
    """

    storage: StorageOptions = StorageOptions()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        name = f"image {row.get('image_id')} ({row.get('image_uri') or 'embedded'})"
        try:
            if row.get("error"):
                raise ImageError(str(row["error"]), "flagged by prepare")
            data = row.get("image")
            if data is None:
                if not row.get("image_uri"):
                    raise ImageError(f"{name}: neither embedded bytes nor an image_uri", "missing image")
                data = read_image_bytes(row["image_uri"], self.storage)
            pixels, error = decode_image(data, name), NO_ERROR
        except (ImageError, StorageError) as exc:
            pixels, error = EMPTY_PIXELS, str(exc)
        return {"image_id": str(row.get("image_id")), "pixels": pixels, "expressions": row.get("expressions") or [],
                "error": error}


def task_dataset(uri: str, split: str, storage: StorageOptions | None = None, limit: int | None = None,
                 shuffle_blocks: bool = True, seed: int = 0, cache: bool = False) -> ray.data.Dataset:
    """Dataset of decoded image rows of one split (``limit``: the first N images only). The block order is
    shuffled from ``seed``, differently in each epoch (execution) but the same in every run.

    Lazy and streamed by default: every epoch reads and decodes again, so no split is ever held whole.
    ``cache``: read and decode once, here, and keep the decoded rows in Ray's object store; each epoch
    then only reorders the cached blocks. For a split that fits in memory and trains for many epochs (on
    2 CPUs a streamed Shapes-GRES epoch of the clip stage spent 11 of its 24 s outside the steps: waiting for
    the first batch, reading and decoding again, drawing the samples).
    """
    from pipeline.tasks import read_tasks

    storage = storage or StorageOptions()
    ds = read_tasks(uri, storage, splits={split})
    if limit is not None:
        ds = ds.limit(limit)
    if shuffle_blocks and not cache:
        ds = ds.randomize_block_order(seed=seed)  # streamed: the read blocks, before they are decoded
    ds = ds.map(DecodeRow(storage), num_cpus=DECODE_CPUS)
    if cache:
        ds = materialize_in_order(ds)
        if shuffle_blocks:
            ds = ds.randomize_block_order(seed=seed)  # cached: the decoded blocks, anew in each epoch
    return ds


def materialize_in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds.materialize()`` with the blocks in the order of its source, not in the order its parallel tasks
    finish: the seeded block shuffle of a cached split then starts from the same order in every run, as the
    streamed path's does (there Ray Train's ordered ingest keeps it)."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


# ------------------------------------------------------------------------------------------ worker side
def _plain(value: Any) -> Any:
    """Ray Data numpy batches hold nested numpy arrays; turn them into lists for RLE / box code."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def labelled(expressions: Any) -> list[dict[str, Any]]:
    """The expressions usable for training / scoring: with a text and a ground-truth mask, not flagged."""
    out = []
    for e in expressions if expressions is not None else []:
        e = _plain(e)
        if e.get("text") and not e.get("error") and e.get("gt_mask") is not None \
                and e["gt_mask"].get("counts") is not None:
            out.append(e)
    return out


def gt_masks(pixels: np.ndarray, expressions: list[dict[str, Any]], image_id: str) -> list[np.ndarray]:
    """Decoded bool masks, checked against the image size (a mismatch names the image and expression)."""
    h, w = pixels.shape[:2]
    out = []
    for e in expressions:
        size = list(e["gt_mask"]["size"])
        if size != [h, w]:
            raise ValueError(f"image {image_id}: expression {e.get('expression_id')} has a {size} mask for a "
                             f"{h}x{w} image")
        out.append(rle.decode(e["gt_mask"]))
    return out


def draw_samples(pixels: np.ndarray, expressions: list[dict[str, Any]], image_id: str, k: int,
                 rng: random.Random) -> list[Sample]:
    """One image's sample: min(K, n) of its labelled expressions; none when all drawn ones are no-target."""
    from gsva.training import Sample

    all_masks = gt_masks(pixels, expressions, image_id)
    group = rng.sample(range(len(expressions)), min(k, len(expressions)))
    if not any(all_masks[i].any() for i in group):
        return []
    return [Sample(pixels, [expressions[i]["text"] for i in group], [all_masks[i] for i in group])]


@dataclass
class EpochStats:
    images: int = 0
    samples: int = 0
    skipped_images: int = 0
    # draws that gave nothing to train on, dropped: all expressions no-target (GSVA, as officially replaced),
    # or an image without objects (the pretraining stages)
    all_rejected: int = 0
    first_error: str | None = None


def sample_batches(rows: Iterator[dict[str, np.ndarray]], batch_size: int, k: int, rng: random.Random,
                   stats: EpochStats, draw: Callable[..., list] = draw_samples) -> Iterator[list]:
    """Numpy row batches (Ray Data ``iter_batches``) -> lists of exactly ``batch_size`` samples; the
    remainder that does not fill a batch at the end of the stream is dropped. ``draw(pixels, expressions,
    image_id, k, rng)`` makes an image's samples (the stage's; [] is a dropped draw)."""
    pending: list[Sample] = []
    for fetched in rows:
        for image_id, pixels, expressions, error in zip(fetched["image_id"], fetched["pixels"],
                                                         fetched["expressions"], fetched["error"]):
            usable = labelled(expressions)
            if error or not usable:
                stats.skipped_images += 1
                stats.first_error = stats.first_error or error or f"image {image_id}: no labelled expression"
                continue
            new = draw(np.asarray(pixels, dtype=np.uint8), usable, str(image_id), k, rng)
            stats.images += 1
            stats.all_rejected += not new
            stats.samples += len(new)
            pending.extend(new)
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]


def iterate_rows(shard: Any, shuffle_buffer: int, seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a worker's shard (a Ray ``DataIterator`` or, in local mode, a ``Dataset``); the local
    shuffle is drawn from ``seed`` (None: unseeded)."""
    return shard.iter_batches(batch_size=FETCH_ROWS, batch_format="numpy",
                              local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed)
