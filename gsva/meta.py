"""Checkpoint metadata without torch: the folder layout, ``config.json`` and the model identity.

The annotate driver, the train launcher and ``python -m gsva describe`` read a checkpoint's config and
identity through this module alone, so they never import torch (seconds per job) and never disagree on
the formula. A replica that loads the weights reports the same identity (``gsva.checkpoint``).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from gsva.config import PRESETS, GSVAConfig, preset
from gsva.storage import StorageOptions, filesystem

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gsva-pipeline-checkpoint"
VERSION = 1


def check_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """``meta`` if it is one of our config.json files, else a clear error naming ``where``."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a {FORMAT} config (format={meta.get('format')!r})")
    return meta


def read_meta(uri: str, storage: StorageOptions | None = None) -> dict[str, Any] | None:
    """The parsed config.json of the checkpoint folder at ``uri``; None when there is none (one small read)."""
    fs, path = filesystem(uri, storage)
    config_path = posixpath.join(path, CONFIG_FILE)
    if not fs.exists(config_path):
        return None
    with fs.open(config_path, "rb") as f:
        return check_meta(json.loads(f.read().decode("utf-8")), f"{uri}/{CONFIG_FILE}")


def preset_identity(cfg: GSVAConfig) -> str:
    """A preset's random init is reproducible from its name and seed."""
    return f"preset:{cfg.name}@seed{cfg.seed}"


def checkpoint_identity(meta: dict[str, Any]) -> str:
    """``NAME@sha256:<16 hex of the weights' digest>`` of one of our checkpoints."""
    return f"{meta['config']['name']}@sha256:{meta['weights']['sha256'][:16]}"


def load_config(uri_or_preset: str, storage: StorageOptions | None = None) -> GSVAConfig:
    """A preset's config, or the config.json of a checkpoint at any URI (weights are not read)."""
    if uri_or_preset in PRESETS:
        return preset(uri_or_preset)
    meta = read_meta(uri_or_preset, storage)
    if meta is None:
        raise FileNotFoundError(f"{uri_or_preset!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                                f"checkpoint folder with {CONFIG_FILE}")
    return GSVAConfig.from_dict(meta["config"])
