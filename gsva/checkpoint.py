"""Our checkpoint format and weight I/O for any URI (local, s3://) through fsspec (`gsva.storage`).

A checkpoint is a folder: ``config.json`` (the full GSVAConfig, so every size and preprocessing constant,
plus the weights' sha256 and dtype, and the LoRA adapter spec when saved un-merged), ``model.safetensors``
and the tokenizer (``tokenizer.json`` for the built-in BPE; LLaVA's ``tokenizer.model`` plus
``added_tokens.json`` for real weights). Weights are loaded into a model whose parameters were never initialised (meta
parameters, real buffers), so loading a 13B model costs one read of the file. Pickled weights are only
ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from gsva.builder import build_model
from gsva.config import PRESETS, GSVAConfig, LoRAConfig, preset, sam_differences
from gsva.lora import apply_lora, has_lora, merged_state_dict
from gsva.meta import CONFIG_FILE, FORMAT, VERSION, WEIGHTS_FILE, check_meta, checkpoint_identity, preset_identity
from gsva.modeling import FLOAT32_BUFFERS
from gsva.storage import StorageError, StorageOptions, describe_error, filesystem, is_local, local_path
from gsva.tokens import Tokenizer, build_builtin_tokenizer, check_tokenizer, load_tokenizer

HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------ URIs
@contextmanager
def local_copy(uri: str, storage: StorageOptions | None = None) -> Iterator[str]:
    """A local path for ``uri`` (the path itself when local; else a streamed download to a temp dir)."""
    if is_local(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        yield path
        return
    fs, path = filesystem(uri, storage)
    with tempfile.TemporaryDirectory(prefix="gsva-") as tmp:
        target = os.path.join(tmp, os.path.basename(path.rstrip("/")) or "download")
        try:
            fs.get(path.rstrip("/") + ("/" if fs.isdir(path) else ""), target, recursive=fs.isdir(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
            raise StorageError(describe_error(uri, exc)) from exc
        yield target


def _publish(local_dir: str, uri: str, storage: StorageOptions | None = None) -> None:
    if is_local(uri):
        return
    fs, path = filesystem(uri, storage)
    fs.makedirs(path, exist_ok=True)
    for name in sorted(os.listdir(local_dir)):
        fs.put(os.path.join(local_dir, name), f"{path.rstrip('/')}/{name}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local weights file or folder (.safetensors / .bin / .pth / .pt, sharded folders with or without
    an index) -> state dict. Pickles only with weights_only=True, memory-mapped."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".pth", ".pt")))
        index = [n for n in os.listdir(path) if n.endswith(".index.json")]
        if index:
            with open(os.path.join(path, index[0])) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        if not names:
            raise FileNotFoundError(f"no weight files in {path}")
        state: dict[str, torch.Tensor] = {}
        for name in names:
            state.update(read_state_dict(os.path.join(path, name)))
        return state
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state.get("state_dict", state)  # some releases wrap the weights


# -------------------------------------------------------------------------------------------- building
def empty_model(cfg: GSVAConfig, adapter: LoRAConfig | None = None) -> torch.nn.Module:
    """The model with parameters on the meta device (no memory, no init) and real buffers, ready for
    ``load_state_dict(assign=True)``."""
    with init_empty_weights(include_buffers=False):
        model = build_model(cfg)
        if adapter is not None:
            apply_lora(model, adapter)
    return model


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """Put a complete state dict into an empty model (strict: every key, no extra ones)."""
    state = {k: v.to(dtype=torch.float32 if k in FLOAT32_BUFFERS else dtype) if v.is_floating_point() else v
             for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {result.missing_keys[:10]} "
                         f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:10]} "
                         f"({len(result.unexpected_keys)})")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------- our format
def save_checkpoint(model, tokenizer: Tokenizer, uri: str, storage: StorageOptions | None = None,
                    dtype: torch.dtype | None = None, merge: bool = True) -> str:
    """Write config.json + model.safetensors + the tokenizer to ``uri``; returns the weights' sha256.
    LoRA layers are merged unless ``merge=False`` (then the adapter spec is saved and re-applied on load,
    e.g. to resume LoRA training)."""
    cfg: GSVAConfig = model.cfg
    check_tokenizer(tokenizer, cfg)
    lora = has_lora(model)
    state = merged_state_dict(model, cfg.lora.scaling) if lora and merge else model.state_dict()
    cast = {k: dtype is not None and v.is_floating_point() and k not in FLOAT32_BUFFERS for k, v in state.items()}
    state = {k: (v.to(dtype) if cast[k] else v).detach().cpu().contiguous() for k, v in state.items()}
    local = is_local(uri)
    target = local_path(uri) if local else tempfile.mkdtemp(prefix="gsva-")
    try:
        os.makedirs(target, exist_ok=True)
        save_file(state, os.path.join(target, WEIGHTS_FILE))
        digest = sha256_file(os.path.join(target, WEIGHTS_FILE))
        tokenizer.save(target)
        meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
                "adapter": dataclasses.asdict(cfg.lora) if lora and not merge else None,
                "weights": {"file": WEIGHTS_FILE, "sha256": digest,
                            "dtype": str(dtype or model.dtype).removeprefix("torch.")}}
        with open(os.path.join(target, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        _publish(target, uri, storage)
    finally:
        if not local:
            shutil.rmtree(target, ignore_errors=True)
    return digest


def read_local_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a GSVA checkpoint: no {CONFIG_FILE}")
    with open(path) as f:
        return check_meta(json.load(f), path)


def load_checkpoint(uri: str, storage: StorageOptions | None = None, device: str = "cpu",
                    dtype: torch.dtype | None = None):
    """-> (model, tokenizer, model_id) from a checkpoint folder at any URI."""
    with local_copy(uri, storage) as directory:
        meta = read_local_meta(directory)
        cfg = GSVAConfig.from_dict(meta["config"])
        adapter = LoRAConfig(**{**meta["adapter"], "targets": tuple(meta["adapter"]["targets"])}) \
            if meta.get("adapter") else None
        tokenizer = load_tokenizer(directory)
        check_tokenizer(tokenizer, cfg)
        weights = os.path.join(directory, meta["weights"]["file"])
        model = assign_weights(empty_model(cfg, adapter), load_file(weights), dtype or torch.float32, device)
        if not meta["weights"].get("sha256"):
            meta["weights"]["sha256"] = sha256_file(weights)
    return model, tokenizer, checkpoint_identity(meta)


def load_model(uri_or_preset: str, storage: StorageOptions | None = None, device: str = "cpu",
               dtype: torch.dtype | None = None):
    """A preset name (random init with the config's seed, built-in tokenizer) or a checkpoint URI."""
    if uri_or_preset in PRESETS:
        cfg = preset(uri_or_preset)
        if cfg.tokenizer != "builtin-bpe":
            raise ValueError(f"preset {cfg.name!r} needs pretrained weights and tokenizer: convert the official "
                             "release first (python -m gsva convert ...) and load that checkpoint")
        model = build_model(cfg).to(device=device, dtype=dtype or torch.float32).eval()
        return model, build_builtin_tokenizer(cfg), preset_identity(cfg)
    return load_checkpoint(uri_or_preset, storage, device, dtype)


#: Which base provides which weights when a GSVA model is assembled from pretrained parts (as real GSVA
#: starts from SAM's release and LLaVA's): SAM's three modules from the SAM base, the MLLM (CLIP,
#: projector, LLM) from the LLaVA base; ``text_hidden_fcs`` (GSVA's own) starts at the LLaVA base's.
SAM_BASE_PREFIX = "sam."


def combine_bases(sam_uri: str, llava_uri: str, storage=None, device: str = "cpu"):
    """-> (model, tokenizer, report): the LLaVA base with every ``sam.*`` weight replaced by the SAM base's.
    Their SAM configs must be equal; everything else (config, weights, tokenizer) is the LLaVA base's, so a
    SAM base trained once serves LLaVA bases that differ elsewhere (e.g. CLIP's ``aspect``)."""
    model, tokenizer, llava_id = load_checkpoint(llava_uri, storage, device)
    sam_model, _, sam_id = load_checkpoint(sam_uri, storage, device)
    differ = sam_differences(sam_model.cfg, model.cfg)
    if differ:
        raise ValueError(f"the SAM base {sam_uri} and the LLaVA base {llava_uri} have different SAM configs "
                         f"({', '.join(differ)} differ)")
    sam_state = {k: v for k, v in sam_model.state_dict().items() if k.startswith(SAM_BASE_PREFIX)}
    result = model.load_state_dict(sam_state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"SAM base keys the model lacks: {result.unexpected_keys[:5]}")
    return model, tokenizer, {"sam": sam_id, "llava": llava_id, "sam_tensors": len(sam_state)}
