"""The output folder's fingerprint: what produced its predictions, checked before any resume.

Rows written by one checkpoint, mode or prompt setting must never be mixed with rows of another in the
same output; the fingerprint makes that a refused start with a clear message instead of a silent mix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import posixpath
from pathlib import Path
from typing import Any

from gsva.config import PRESETS, preset
from gsva.meta import checkpoint_identity as meta_identity
from gsva.meta import preset_identity, read_meta
from pipeline.annotate.config import AnnotateConfig
from pipeline.annotate.layout import OutputLayout, read_optional_json, write_json
from pipeline.schemas import PREDICTION_SCHEMA
from pipeline.storage import StorageOptions, filesystem, is_local

#: Bump when the meaning of the output files changes in a way the schema does not show.
LAYOUT_VERSION = 1
#: The sources whose code decides what a prediction row contains (the model, decoding, this job, formats).
_CODE_PATHS = ("gsva", "pipeline/annotate", "pipeline/images.py", "pipeline/masks.py", "pipeline/schemas.py")
_HASH_CHUNK = 1 << 20


class FingerprintMismatch(RuntimeError):
    """Resuming into an output written by a different configuration."""


def checkpoint_identity(checkpoint: str, storage: StorageOptions) -> str:
    """The `model_id` the replicas will report, computed on the driver without loading any weights.

    Same formula as gsva.checkpoint.load_model: a preset -> "preset:NAME@seedS"; one of our checkpoints ->
    "NAME@sha256:<16 hex of the weights' digest recorded in config.json>" (one small read, no download).
    Other weight files (no recorded digest) -> a digest of their names and sizes/ETags (or local contents).
    """
    fs, path = filesystem(checkpoint, storage)
    if not fs.exists(path):
        if checkpoint in PRESETS:
            return preset_identity(preset(checkpoint))
        raise FileNotFoundError(f"checkpoint {checkpoint!r} is neither an existing file or folder nor a preset "
                                f"({', '.join(sorted(PRESETS))})")
    meta = read_meta(checkpoint, storage) if fs.isdir(path) else None
    if meta is not None and (meta.get("weights") or {}).get("sha256"):
        return meta_identity(meta)
    return _content_identity(fs, path, is_local(checkpoint))


def _content_identity(fs, path: str, local: bool) -> str:
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    digest = hashlib.sha256()
    for name in files:
        digest.update(posixpath.relpath(name, path).encode("utf-8") + b"\0")
        if local:
            with fs.open(name, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
        else:
            info = fs.info(name)
            digest.update(f"{info.get('size')}:{info.get('ETag') or info.get('etag')}".encode())
    return f"files@sha256:{digest.hexdigest()[:16]}"


def code_version() -> str:
    """Package version plus a digest of the model and pipeline sources (a code change is a new version)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for name in _CODE_PATHS:
        top = root / name
        for source in sorted(top.rglob("*.py")) if top.is_dir() else [top]:
            digest.update(str(source.relative_to(root)).encode("utf-8") + b"\0" + source.read_bytes())
    try:
        version = importlib.metadata.version("gsva-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+src.{digest.hexdigest()[:12]}"


def fingerprint(config: AnnotateConfig, model_identity: str) -> dict[str, Any]:
    """Everything that changes what a prediction row says; scheduling (replicas, batch size) is absent."""
    return {
        "model": model_identity,
        "checkpoint": config.checkpoint,
        "mode": config.mode,
        "max_expressions_per_prompt": config.max_expressions_per_prompt,
        "max_expression_chars": config.limits.max_expression_chars,
        "max_image_pixels": config.limits.image.max_pixels,
        "min_image_side": config.limits.image.min_side,
        "max_image_bytes": config.limits.image.max_bytes,
        "code_version": code_version(),
        "schema": hashlib.sha256(str(PREDICTION_SCHEMA).encode("utf-8")).hexdigest()[:12],
        "layout_version": LAYOUT_VERSION,
    }


def check_or_record(layout: OutputLayout, expected: dict[str, Any]) -> bool:
    """Record the fingerprint in a fresh output (True), accept an identical one (False), refuse any other.

    `checkpoint` (where the weights were read from) is informational: the same weights moved to another
    path have the same `model` identity and may resume.
    """
    fs, _ = layout.fs()
    found = read_optional_json(fs, layout.fingerprint)
    if found is None:
        write_json(fs, layout.fingerprint, expected, layout.staging)
        return True
    differences = [f"{k}: output has {found.get(k)!r}, this run {v!r}" for k, v in expected.items()
                   if k != "checkpoint" and found.get(k) != v]
    if differences:
        raise FingerprintMismatch(
            f"refusing to resume into {layout.uri}: its predictions were made by a different configuration ("
            + "; ".join(differences) + "). Use a new --output, or --overwrite to discard them.")
    return False
