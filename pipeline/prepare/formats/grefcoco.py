"""gRefCOCO reader: `grefs(unc).json` + COCO `instances.json` + an image folder -> ImageItems / task rows.

Facts carried over from the gRefCOCO/ReLA loaders: a ref's `ann_id` is a list; no-target is `ann_id == [-1]`
(some copies also set `no_target: true`, honoured too); every sentence is one sample. The ground truth of a
multi-target ref is the union of its instances' masks. Crowd (`iscrowd`) annotations are KEPT in the union,
as GSVA's loader does (ReLA and grefer drop them); their RLE segmentations rasterise like any other.
"""

from __future__ import annotations

from typing import Any

from pipeline.prepare.formats.coco import index_instances, is_int, normalise_ref, refs_to_items
from pipeline.prepare.formats.items import ImageItem, SkipReport, SourceError, read_task_rows_with
from pipeline.storage import StorageOptions, join, read_json

DATASET = "grefcoco"
SPLIT_BY = "unc"  # the only split gRefCOCO is released with
NO_TARGET_ANN = -1


def refs_file(split_by: str = SPLIT_BY) -> str:
    return f"grefs({split_by}).json"


def _normalise(refs: Any, skips: SkipReport) -> list[dict[str, Any]]:
    if not isinstance(refs, list):
        raise SourceError(f"{refs_file()} must hold a JSON list of refs, got {type(refs).__name__}")
    out = []
    for pos, ref in enumerate(refs):
        if not isinstance(ref, dict):
            skips.add("corrupt ref", f"refs[{pos}]", f"not an object: {type(ref).__name__}")
            continue
        raw = ref.get("ann_id")
        raw = raw if isinstance(raw, list) else [raw]
        if not raw or not all(is_int(a) for a in raw):
            skips.add("corrupt ref", f"ref {ref.get('ref_id')} (refs[{pos}])",
                      f"ann_id {ref.get('ann_id')!r}")
            continue
        no_target = bool(ref.get("no_target")) or raw == [NO_TARGET_ANN]
        if not no_target and NO_TARGET_ANN in raw:
            skips.add("corrupt ref", f"ref {ref.get('ref_id')} (refs[{pos}])",
                      f"ann_id {raw} mixes -1 (no target) with targets")
            continue
        common = normalise_ref(ref, [] if no_target else [int(a) for a in raw], skips, pos)
        if common is not None:
            out.append(common)
    return out


def load_items(refs: Any, instances: Any, *, images_root: str, dataset: str = DATASET,
               splits: frozenset[str] | None = None, skips: SkipReport | None = None) -> list[ImageItem]:
    """Parsed grefs + instances JSON -> ImageItems (pure: no file is read)."""
    skips = skips if skips is not None else SkipReport()
    index = index_instances(instances, skips)
    return refs_to_items(_normalise(refs, skips), index, dataset=dataset, images_root=images_root,
                         splits=splits, skips=skips)


def read_items(root: str, *, images_root: str | None = None, dataset: str = DATASET,
               splits: frozenset[str] | None = None, storage: StorageOptions | None = None,
               skips: SkipReport | None = None) -> list[ImageItem]:
    """Read `root`/grefs(unc).json and `root`/instances.json (local or URI); images under `images_root`
    (default `root`/images)."""
    refs = read_json(join(root, refs_file()), storage)
    instances = read_json(join(root, "instances.json"), storage)
    return load_items(refs, instances, images_root=images_root or join(root, "images"), dataset=dataset,
                      splits=splits, skips=skips)


def read_task_rows(root: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Serial convenience: the task rows of a (small) gRefCOCO-format dataset, images referenced."""
    return read_task_rows_with(read_items, root, **kwargs)
