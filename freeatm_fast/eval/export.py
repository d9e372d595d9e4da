"""Backbone export: a timm model's weights as one safetensors file that plain timm loads (DESIGN §8).

The file holds the backbone's ``state_dict`` (contiguous CPU tensors, floating point as fp32) and string
metadata ``{"format": "freeatm-backbone-v1", "model": <timm name>, "model_kwargs": <JSON>}``, so that::

    model = timm.create_model(name, pretrained=False, num_classes=0, checkpoint_path=path, **model_kwargs)

rebuilds the backbone without this package (timm picks the safetensors reader from the ``.safetensors``
suffix, which is therefore required), and ``load_backbone(path)`` does the same from the metadata alone.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "BackboneFileError", "export_backbone", "load_backbone", "read_backbone_metadata"]

FORMAT = "freeatm-backbone-v1"
SUFFIX = ".safetensors"
# Prefixes that wrappers add to state-dict keys (torch.compile, DDP / DeepSpeed engines); timm strips the same.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# timm.create_model arguments that the load command sets itself; a duplicate would be a TypeError there.
_RESERVED_KWARGS = ("num_classes", "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


class BackboneFileError(ValueError):
    """A backbone file is missing, not safetensors, or does not match the model; the message names the file."""


def _clean_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _check_kwargs(model_kwargs: Any, where: str) -> dict:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise BackboneFileError(f"{where}: model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    reserved = sorted(k for k in model_kwargs if k in _RESERVED_KWARGS)
    if reserved:
        raise BackboneFileError(
            f"{where}: model_kwargs must not set {reserved} (the backbone is always created with pretrained=False, "
            f"num_classes=0)"
        )
    kwargs = dict(model_kwargs)
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BackboneFileError(f"{where}: model_kwargs {kwargs!r} are not JSON-serialisable ({exc})") from exc
    return kwargs


def _create(model_name: str, model_kwargs: dict, where: str, device: str | torch.device = "cpu") -> nn.Module:
    import timm

    try:
        with torch.device(device):
            return timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:  # timm: RuntimeError("Unknown model ...")
        raise BackboneFileError(
            f"{where}: cannot create timm model {model_name!r} with {model_kwargs}: {type(exc).__name__}: {exc}"
        ) from exc


def _mismatch(got: Mapping[str, torch.Size], want: Mapping[str, torch.Size]) -> str | None:
    """Describe how a state dict's keys/shapes (``got``) differ from a model's (``want``), or None if they match."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k}: {list(got[k])} vs model {list(want[k])}" for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {name} {items[:5]}{more}")
    return "; ".join(parts)


def export_backbone(
    backbone: nn.Module | Mapping[str, torch.Tensor],
    model_name: str,
    model_kwargs: dict | None,
    path: str | os.PathLike,
) -> Path:
    """Write ``backbone``'s weights to ``path`` (``*.safetensors``) atomically; returns the path.

    backbone: the timm model built as ``timm.create_model(model_name, num_classes=0, **model_kwargs)`` (possibly
        wrapped by ``torch.compile`` / DDP, whose key prefixes are removed), or its state dict (e.g. gathered from
        ZeRO-3 partitions by the caller: this function reads plain tensors only).
    The keys and shapes are checked against a freshly built model (on the meta device, no memory) before anything
    is written, so a file that exists always loads with ``timm.create_model(..., checkpoint_path=path)``.
    Floating-point tensors are stored as fp32, others (BatchNorm's ``num_batches_tracked``) as they are; every
    tensor is copied to a contiguous CPU tensor, so tied weights are stored once per key. The file is written under
    a temporary name, fsynced and renamed: readers see the previous file or the new one, never a part.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise BackboneFileError(f"{path}: a backbone file must end in {SUFFIX!r} (timm picks its reader by suffix)")
    kwargs = _check_kwargs(model_kwargs, str(path))
    state = backbone.state_dict() if isinstance(backbone, nn.Module) else backbone
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneFileError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        clean = _clean_key(key)
        if clean in tensors:
            raise BackboneFileError(f"{path}: state dict keys {key!r} and {clean!r} collide once wrappers are removed")
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        tensors[clean] = value.to("cpu", copy=True).contiguous()
    reference = _create(model_name, kwargs, str(path), device="meta")
    want = {k: v.shape for k, v in reference.state_dict().items()}
    problem = _mismatch({k: v.shape for k, v in tensors.items()}, want)
    if problem:
        raise BackboneFileError(
            f"{path}: not written: the weights do not match timm.create_model({model_name!r}, num_classes=0, "
            f"**{kwargs}): {problem}"
        )
    metadata = {"format": FORMAT, "model": model_name, "model_kwargs": json.dumps(kwargs, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _open_error(path: Path) -> BackboneFileError | None:
    if not path.exists():
        return BackboneFileError(f"{path}: backbone file does not exist")
    if not path.is_file():
        return BackboneFileError(f"{path}: backbone path is not a file")
    return None


def read_backbone_metadata(path: str | os.PathLike) -> dict:
    """The safetensors metadata of a backbone file (``{}`` when it has none); BackboneFileError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    err = _open_error(path)
    if err:
        raise err
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError for foreign files
        raise BackboneFileError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc


def load_backbone(
    path: str | os.PathLike, model_name: str | None = None, model_kwargs: dict | None = None
) -> nn.Module:
    """Build the timm backbone stored in ``path`` and load its weights (strict); returns it in eval mode on CPU.

    ``model_name`` / ``model_kwargs`` default to the file's metadata (written by :func:`export_backbone`); pass
    them to load a safetensors file from elsewhere. Raises :class:`BackboneFileError` naming the file when it is
    missing, not safetensors, lacks the model name, or its keys/shapes do not match the model.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_backbone_metadata(path)
    if model_name is None:
        model_name = meta.get("model")
        if not model_name:
            raise BackboneFileError(
                f"{path}: no 'model' in the file's metadata (format {meta.get('format')!r}); pass the timm model name"
            )
    if model_kwargs is None:
        try:
            model_kwargs = json.loads(meta.get("model_kwargs", "{}"))
        except json.JSONDecodeError as exc:
            raise BackboneFileError(f"{path}: metadata 'model_kwargs' is not JSON ({exc})") from exc
    kwargs = _check_kwargs(model_kwargs, str(path))
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # same foreign-file failures as above, found while reading the tensors
        raise BackboneFileError(f"{path}: cannot read the tensors ({type(exc).__name__}: {exc})") from exc
    model = _create(model_name, kwargs, str(path))
    state = {_clean_key(k): v for k, v in state.items()}
    problem = _mismatch({k: v.shape for k, v in state.items()}, {k: v.shape for k, v in model.state_dict().items()})
    if problem:
        raise BackboneFileError(f"{path}: weights do not match timm model {model_name!r} with {kwargs}: {problem}")
    model.load_state_dict(state, strict=True)
    return model.eval()
