"""Evaluation of learned backbones: kNN, linear probe, backbone export (DESIGN §2, §8).

Submodules (import the one you need; ``import freeatm_fast.eval`` itself imports no torch):

- ``export``: ``export_backbone(backbone, model_name, model_kwargs, path)`` / ``load_backbone(path)`` — the
  backbone as a safetensors file that ``timm.create_model(..., checkpoint_path=path)`` loads.
- ``datasets``: ``open_labelled(root, image_size, crop_ratio)`` — labelled shards or an ImageFolder.
- ``features``: ``extract_features(backbone, dataset, ...)`` -> L2-normalised features [N, C], labels [N].
- ``knn``: ``knn_accuracy(...)`` — weighted kNN (InstDisc / MoCo protocol).
- ``linear``: ``linear_probe(...)`` — logistic regression on frozen features.
- ``run``: ``evaluate(backbone, cfg, *, device, train_root, val_root)`` — all of the above from ``cfg.eval``.
- ``retrieval``: image-text retrieval R@1/5/10 for BLIP / ViLT runs.
- ``masks``: ``evaluate_shards(dir, ...)`` / ``evaluate_renoise(model, ...)`` — mIoU and pointing accuracy of
  free masks, per word (``freeatm eval masks``).

The same names are available here lazily (``from freeatm_fast.eval import evaluate`` imports only then).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_backbone": "export",
    "load_backbone": "export",
    "BackboneFileError": "export",
    "open_labelled": "datasets",
    "eval_transform": "datasets",
    "extract_features": "features",
    "knn_accuracy": "knn",
    "linear_probe": "linear",
    "evaluate": "run",
    "summary_line": "run",
    "evaluate_shards": "masks",
    "evaluate_renoise": "masks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
