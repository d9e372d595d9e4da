"""Backbones: any timm model by name, optional local initial weights, pooled features and feature maps.

``build_backbone(model_cfg)`` creates ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` (nothing
is downloaded at run time) and loads ``model.pretrained`` when it names a local ``.safetensors`` / ``.pth`` file.
``encode(backbone, x)`` runs the trunk once and returns both the pooled features [B,C] (what ``backbone(x)``
returns) and the feature map [B,C,h,w] that the instance losses mask-pool.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from freeatm_fast.config import ConfigError

# keys a checkpoint may wrap its state dict in, tried in order
_WRAPPER_KEYS = ("state_dict", "model", "module", "backbone")
# prefixes stripped from checkpoint keys (DDP / DeepSpeed wrappers, our own methods' attribute name)
_PREFIXES = ("module.", "backbone.")


def build_backbone(model_cfg) -> nn.Module:
    """A timm model without classifier: ``backbone(x)`` [B,3,S,S] -> pooled features [B,C].

    model_cfg: :class:`freeatm_fast.config.ModelConfig` (``backbone``, ``backbone_kwargs``, ``pretrained``).
    Raises ConfigError naming ``model.backbone`` for an unknown timm model or bad kwargs, and naming the file for
    a bad ``model.pretrained``.
    """
    import timm

    name = model_cfg.backbone
    kwargs = dict(model_cfg.backbone_kwargs)
    for reserved in ("pretrained", "num_classes"):
        if reserved in kwargs:
            raise ConfigError(f"model.backbone_kwargs: {reserved!r} is set by the method; remove it")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.backbone: {name!r} is not a timm model{hint}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.backbone_kwargs: {kwargs!r} rejected by timm model {name!r}: {exc}") from exc
    if model_cfg.pretrained:
        load_pretrained(model, model_cfg.pretrained)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ConfigError(f"model.pretrained: cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a corrupt or non-checkpoint file
        raise ConfigError(f"model.pretrained: cannot read checkpoint {path}: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.pretrained: {path} holds no state dict of tensors (got {type(obj).__name__})")
    return obj


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict into ``model`` strictly.

    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` / ``backbone.`` key prefixes are
    removed; the classifier of an ImageNet checkpoint (the model's ``default_cfg["classifier"]`` keys) is dropped,
    since backbones have ``num_classes=0``. Any other missing, unexpected or mis-shaped key raises ConfigError
    naming the file and the keys. Hub ids are not downloaded at run time: the path must exist.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained: {str(path)!r} is not a file (a local .safetensors/.pth is required; nothing is "
            "downloaded at run time)"
        )
    state = _read_state_dict(path)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    own = model.state_dict()
    classifier = getattr(model, "default_cfg", {}).get("classifier", None) or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(c + ".") for c in classifier)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = [
            f"{name}: {show(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ConfigError(f"model.pretrained: {path} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def pooled_dim(backbone: nn.Module) -> int:
    """Width of ``backbone(x)`` (pooled features): timm's ``head_hidden_size`` (pre-logits width) or num_features."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def map_dim(backbone: nn.Module) -> int:
    """Channels of :func:`feature_map`: timm's ``num_features``."""
    return int(backbone.num_features)


def _tokens_to_map(backbone: nn.Module, tokens: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """ViT tokens [B, prefix + h*w, C] -> patch grid [B,C,h,w] (prefix = class / register tokens, dropped)."""
    B, N, C = tokens.shape
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(image_hw)
    elif patch_embed is not None and hasattr(patch_embed, "grid_size"):
        h, w = patch_embed.grid_size
    else:
        h = w = int(round((N - prefix) ** 0.5))
    if h * w != N - prefix:
        raise ValueError(
            f"feature_map: {type(backbone).__name__} returned {N} tokens with {prefix} prefix tokens, which is not a "
            f"{h}x{w} patch grid for input {image_hw}"
        )
    return tokens[:, prefix:].reshape(B, h, w, C).permute(0, 3, 1, 2)


def _to_map(backbone: nn.Module, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    if feats.dim() == 3:
        return _tokens_to_map(backbone, feats, image_hw)
    if feats.dim() == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin, some hybrid models
            return feats.permute(0, 3, 1, 2)
        return feats
    raise ValueError(f"feature_map: {type(backbone).__name__}.forward_features returned shape {tuple(feats.shape)}")


def encode(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One trunk pass: x [B,3,S,S] -> (pooled [B,C'] equal to ``backbone(x)``, feature map [B,C,h,w]).

    The feature map is a view of the trunk output (no copy): channels_last for a channels_last CNN, a permuted
    token tensor for a ViT; ``mask_pool`` reads any strides.
    """
    feats = backbone.forward_features(x)
    pooled = backbone.forward_head(feats, pre_logits=True)
    return pooled, _to_map(backbone, feats, tuple(x.shape[-2:]))


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features before pooling: x [B,3,S,S] -> [B,C,h,w].

    CNN: ``forward_features`` (NHWC outputs permuted to NCHW). ViT: the patch tokens after the final norm, prefix
    (class / register) tokens removed, reshaped to the h x w patch grid.
    """
    return _to_map(backbone, backbone.forward_features(x), tuple(x.shape[-2:]))
