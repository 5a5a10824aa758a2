"""RefCOCO / RefCOCO+ / RefCOCOg reader: `refs(SPLITBY).p` + COCO `instances.json` -> ImageItems.

The refs files are Python 2 pickles. A pickle can run arbitrary code on load, and these files come from
buckets and mirrors, so they are read by `restricted_loads`: an unpickler that admits only plain
containers and scalars (no class or function is ever looked up, bar set/frozenset), with
`encoding="latin1"` for Python 2 `str`. Each ref has a single int `ann_id` (always one target).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from pipeline.prepare.formats.coco import index_instances, is_int, normalise_ref, refs_to_items
from pipeline.prepare.formats.items import ImageItem, SkipReport, SourceError, read_task_rows_with
from pipeline.storage import StorageOptions, filesystem, join, read_json

#: dataset name -> (default split-by, the split-bys the dataset is released with)
SPLIT_BYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "refcoco": ("unc", ("unc", "google")),
    "refcoco+": ("unc", ("unc",)),
    "refcocog": ("umd", ("umd", "google")),
}
#: The only globals a refs pickle may name: harmless constructors of plain containers.
_ALLOWED_GLOBALS = frozenset({("builtins", "set"), ("builtins", "frozenset"),
                              ("__builtin__", "set"), ("__builtin__", "frozenset")})


class UnsafePickleError(SourceError, pickle.UnpicklingError):
    """The pickle names a class or function: refused before anything runs."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return set if name == "set" else frozenset
        raise UnsafePickleError(f"refused to load {module}.{name}: refs pickles may hold only plain "
                                f"containers and scalars")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent id: refs pickles may hold only plain data")


def restricted_loads(data: bytes, name: str = "pickle") -> Any:
    """Unpickle plain data only (dict, list, tuple, str, bytes, int, float, bool, None, set).

    Raises UnsafePickleError for anything that names a global, SourceError for a damaged pickle.
    """
    try:
        return _PlainDataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{name}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise SourceError(f"{name} is not a readable pickle: {type(exc).__name__}: {exc}") from exc


def refs_file(split_by: str) -> str:
    return f"refs({split_by}).p"


def default_split_by(dataset: str) -> str:
    if dataset not in SPLIT_BYS:
        raise ValueError(f"unknown RefCOCO-family dataset {dataset!r}; expected one of {sorted(SPLIT_BYS)}")
    return SPLIT_BYS[dataset][0]


def _normalise(refs: Any, skips: SkipReport) -> list[dict[str, Any]]:
    if not isinstance(refs, list):
        raise SourceError(f"a refs pickle must hold a list of refs, got {type(refs).__name__}")
    out = []
    for pos, ref in enumerate(refs):
        if not isinstance(ref, dict) or not is_int(ref.get("ann_id")):
            what = ref.get("ann_id") if isinstance(ref, dict) else type(ref).__name__
            skips.add("corrupt ref", f"refs[{pos}]", f"needs an int ann_id, got {what!r}")
            continue
        common = normalise_ref(ref, [int(ref["ann_id"])], skips, pos)
        if common is not None:
            out.append(common)
    return out


def load_items(refs: Any, instances: Any, *, images_root: str, dataset: str = "refcoco",
               splits: frozenset[str] | None = None, skips: SkipReport | None = None) -> list[ImageItem]:
    """Unpickled refs + parsed instances JSON -> ImageItems (pure: no file is read)."""
    skips = skips if skips is not None else SkipReport()
    index = index_instances(instances, skips)
    return refs_to_items(_normalise(refs, skips), index, dataset=dataset, images_root=images_root,
                         splits=splits, skips=skips)


def read_items(root: str, *, dataset: str = "refcoco", split_by: str | None = None,
               images_root: str | None = None, splits: frozenset[str] | None = None,
               storage: StorageOptions | None = None, skips: SkipReport | None = None) -> list[ImageItem]:
    """Read `root`/refs(SPLIT_BY).p and `root`/instances.json; images under `images_root` (default
    `root`/images)."""
    split_by = split_by or default_split_by(dataset)
    known = SPLIT_BYS.get(dataset, (None, ()))[1]
    if split_by not in known:
        raise ValueError(f"{dataset} is released with split-by {', '.join(known)}, not {split_by!r}")
    fs, path = filesystem(join(root, refs_file(split_by)), storage)
    with fs.open(path, "rb") as f:
        refs = restricted_loads(f.read(), join(root, refs_file(split_by)))
    instances = read_json(join(root, "instances.json"), storage)
    return load_items(refs, instances, images_root=images_root or join(root, "images"), dataset=dataset,
                      splits=splits, skips=skips)


def read_task_rows(root: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Serial convenience: the task rows of a (small) RefCOCO-family dataset, images referenced."""
    return read_task_rows_with(read_items, root, **kwargs)
