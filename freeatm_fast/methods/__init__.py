"""Training methods: one file per method, each a ``torch.nn.Module`` with a timm backbone and its loss (DESIGN §7).

Every method has ``backbone`` (timm, ``backbone(x)`` -> [B,C]), ``forward(batch) -> {"loss": ..., logs}``,
``after_step(step, max_steps)``, ``param_groups(weight_decay)`` and ``feature_map(x)`` -> [B,C,h,w]; the shared
pieces live in :mod:`freeatm_fast.methods.common`.

Import-light on purpose: the registry maps a method name to ``"module:Class"`` and :func:`build_method` imports
the module only when it is built. Add a method by adding a file and a :data:`METHOD_REGISTRY` entry (or call
:func:`register_method`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from freeatm_fast.config import ConfigError

if TYPE_CHECKING:
    from freeatm_fast.config import Config
    from freeatm_fast.methods.common import Method

METHOD_REGISTRY: dict[str, str] = {
    "mocov2": "freeatm_fast.methods.mocov2:MoCoV2",
    "simclr": "freeatm_fast.methods.simclr:SimCLR",
    "stablerep": "freeatm_fast.methods.stablerep:StableRep",
    "detcon": "freeatm_fast.methods.detcon:DetCon",
    "multicrop": "freeatm_fast.methods.multicrop:Multicrop",
    "mae": "freeatm_fast.methods.mae:MAE",
    "blip": "freeatm_fast.methods.blip:BLIP",
    "vilt": "freeatm_fast.methods.vilt:ViLT",
}


def register_method(name: str, target: str) -> None:
    """Register ``name`` -> ``"package.module:Class"`` (the class takes the :class:`Config` as its only argument)."""
    if ":" not in target:
        raise ValueError(f"register_method: target must look like 'package.module:Class', got {target!r}")
    METHOD_REGISTRY[name] = target


def method_class(name: str) -> type:
    """The class registered for ``name`` (imports its module); ConfigError naming ``method`` when unknown."""
    target = METHOD_REGISTRY.get(name)
    if target is None:
        raise ConfigError(
            f"method: {name!r} is not implemented (registered methods: {', '.join(sorted(METHOD_REGISTRY))})"
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(cfg: Config) -> Method:
    """The method named by ``cfg.method``, built from the whole config (backbone, heads, loss settings)."""
    return method_class(cfg.method)(cfg)


__all__ = ["METHOD_REGISTRY", "build_method", "method_class", "register_method"]
