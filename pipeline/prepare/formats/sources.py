"""Which source to read, as one validated config, and the dispatch to its reader."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.prepare.formats import grefcoco, manifest, refcoco, shapes
from pipeline.prepare.formats.items import ImageItem, SkipReport
from pipeline.storage import StorageOptions, join

FORMATS = ("grefcoco", "refcoco", "refcoco+", "refcocog", "manifest", "shapes")
REFCOCO_FAMILY = ("refcoco", "refcoco+", "refcocog")


@dataclass(frozen=True)
class SourceConfig:
    """A source dataset. `root`: the dataset folder (COCO-like formats), the manifest file (manifest), or
    where the generated raw files go (shapes). `images`: the image folder, default `root`/images."""

    format: str
    root: str
    images: str | None = None
    splits: frozenset[str] | None = None
    split_by: str | None = None
    num_images: int | None = None
    seed: int | None = None  # shapes only; None there means 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if not self.root:
            raise ValueError(f"--format {self.format} needs --root")
        if self.format == "shapes":
            if self.num_images is None or self.num_images < 1:
                raise ValueError("--format shapes needs --num-images N (N >= 1)")
            if self.images is not None:
                raise ValueError("--format shapes writes its images under ROOT/images; "
                                 "--images does not apply")
        elif self.num_images is not None or self.seed is not None:
            raise ValueError("--num-images and --seed apply only to --format shapes")
        if self.format == "manifest" and (self.splits is not None or self.images is not None):
            raise ValueError("--splits and --images do not apply to --format manifest "
                             "(its rows name their images)")
        if self.split_by is not None:
            if self.format not in REFCOCO_FAMILY:
                raise ValueError("--split-by applies only to refcoco, refcoco+ and refcocog")
            refcoco_split_bys = refcoco.SPLIT_BYS[self.format][1]
            if self.split_by not in refcoco_split_bys:
                raise ValueError(f"{self.format} is released with --split-by {', '.join(refcoco_split_bys)}, "
                                 f"not {self.split_by!r}")

    @property
    def dataset(self) -> str:
        if self.format == "shapes":
            return shapes.DATASET
        if self.format == "manifest":
            return manifest.dataset_name(self.root)
        return self.format


def load_items(source: SourceConfig, storage: StorageOptions | None = None,
               skips: SkipReport | None = None) -> list[ImageItem]:
    """Read (for shapes: first generate) the source and return its ImageItems; skips are recorded."""
    skips = skips if skips is not None else SkipReport()
    if source.format == "manifest":
        return manifest.read_items(source.root, storage=storage, skips=skips)
    if source.format in REFCOCO_FAMILY:
        return refcoco.read_items(source.root, dataset=source.format, split_by=source.split_by,
                                  images_root=source.images, splits=source.splits, storage=storage,
                                  skips=skips)
    if source.format == "shapes":
        shapes.generate(source.root, int(source.num_images or 0), source.seed or 0, storage)
        return grefcoco.read_items(source.root, images_root=join(source.root, "images"),
                                   dataset=shapes.DATASET, splits=source.splits, storage=storage,
                                   skips=skips)
    return grefcoco.read_items(source.root, images_root=source.images, splits=source.splits, storage=storage,
                               skips=skips)
